// CPU kernels of the mamlen::* ops (schemas: kernels/_dispatch.py). This file checks every input, allocates
// outputs, splits the elements over threads (OpenMP, dynamic chunks: see run()) and hands each chunk
// to the SIMD loops of fused_kernels.cpp for the CPU capability picked at run time.
//
// Capability scheme: fused_kernels.cpp is compiled for DEFAULT (any x86-64 / other CPU), AVX2+FMA and
// AVX-512 (CMakeLists.txt, only where the compiler supports the flags). We follow
// at::get_cpu_capability(), i.e. exactly the variant torch's own kernels use on this CPU (cpuinfo
// detection, overridable with ATEN_CPU_CAPABILITY=default|avx2|avx512), and fall back to the best
// variant we have compiled that does not exceed it. So one build is fast here and still loads and runs
// correctly on a CPU without AVX2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <utility>
#include <vector>
#include <cmath>
#include <cstdint>
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels.h"

namespace mamlen::cpu {
namespace {

// The variants this build has and this CPU may run, best first: what at::get_cpu_capability() allows
// ("AVX512", "AVX2", "DEFAULT", ...; exported by ATen, honours ATEN_CPU_CAPABILITY).
std::vector<std::pair<std::string, RunChunk>> allowed_variants() {
  const std::string cap = at::get_cpu_capability();
  std::vector<std::pair<std::string, RunChunk>> out;
#if defined(MAMLEN_HAVE_AVX512)
  if (cap == "AVX512") out.emplace_back("avx512", &AVX512::run_chunk);
#endif
#if defined(MAMLEN_HAVE_AVX2)
  if (cap == "AVX2" || cap == "AVX512") out.emplace_back("avx2", &AVX2::run_chunk);
#endif
  (void)cap;
  out.emplace_back("default", &DEFAULT::run_chunk);
  return out;
}

std::atomic<RunChunk> g_variant{nullptr};

RunChunk variant() {
  RunChunk fn = g_variant.load(std::memory_order_acquire);
  if (fn == nullptr) {
    fn = allowed_variants().front().second;
    g_variant.store(fn, std::memory_order_release);
  }
  return fn;
}

std::string cpu_variant() {
  const RunChunk fn = variant();
  for (const auto& [name, f] : allowed_variants())
    if (f == fn) return name;
  return "unknown";
}

// Tests (and anyone comparing variants) switch at run time; only variants this CPU supports are accepted.
std::string set_cpu_variant(const std::string& name) {
  const std::string previous = cpu_variant();
  std::string names;
  for (const auto& [n, f] : allowed_variants()) {
    if (n == name) {
      g_variant.store(f, std::memory_order_release);
      return previous;
    }
    names += (names.empty() ? "" : ", ") + n;
  }
  TORCH_CHECK(false, "set_cpu_variant: '", name, "' is not available on this build/CPU; available: ", names);
  return previous;
}

// Threading: OpenMP over fixed chunks handed out dynamically (an atomic counter), not one static slice per
// thread as at::parallel_for does. On a CPU shared with other processes a descheduled thread then delays
// only the chunk it holds, instead of half the work. Chunks of 64 Ki elements (256 KiB fp32 per buffer)
// are whole cache lines apart and large enough that the counter costs nothing; a call below two chunks
// stays on the calling thread, as does a call made from inside a parallel region. The team size is torch's
// (at::set_num_threads sets the OpenMP default; libgomp is the copy torch loaded, see CMakeLists.txt).
constexpr int64_t kChunk = int64_t(1) << 16;

// Out-of-place outputs of at least this many elements per buffer are written with streaming stores: with
// 3-4 such outputs they exceed the L2 caches, and nothing reads them before the next op.
constexpr int64_t kStreamMin = int64_t(1) << 20;

void run(Op op, Dt dt, const Buffers& buf, int64_t n, Hyper h) {
  const RunChunk fn = variant();
  // an output that is also an input was just loaded into cache: plain stores (streaming would evict it)
  bool in_place = op == Op::SgdStep || op == Op::FdCombine;
  for (const void* o : buf.out)
    for (const void* i : buf.in)
      in_place = in_place || (o != nullptr && o == i);
  h.stream = !in_place && n >= kStreamMin;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#if defined(_OPENMP)
  if (chunks >= 2 && at::get_num_threads() > 1 && !omp_in_parallel()) {
    std::atomic<int64_t> next{0};
#pragma omp parallel
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(op, dt, buf, c * kChunk, std::min(n, (c + 1) * kChunk), h);
    }
    return;
  }
#endif
  fn(op, dt, buf, 0, n, h);
}

// A fresh output of an out-of-place op. Large CPU allocations are new mmap'd pages, and first-touch page
// faults (4 KiB each) cost more than the arithmetic: measured 5x slower than the in-place op at 2^24 floats.
// Asking for transparent huge pages on the 2 MiB-aligned interior (THP mode "madvise" is the common
// default) cuts the faults 512x; where THP is off or unsupported madvise fails harmlessly.
at::Tensor new_output(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (lo + kHuge - 1) & ~(kHuge - 1), end = (lo + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

// ---- input checks (the Python wrappers check too; these guard direct torch.ops.mamlen calls) ----------

void check_vec(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), fn, ": argument '", name, "' is undefined");
  TORCH_CHECK(t.device().is_cpu(), fn, ": argument '", name, "' must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1, fn, ": argument '", name, "' must be a flat 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), fn, ": argument '", name, "' must be contiguous, got stride ", t.strides());
  TORCH_CHECK(t.numel() == ref.numel(), fn, ": argument '", name, "' has ", t.numel(),
              " elements, expected ", ref.numel());
}

Dt param_dt(const char* fn, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kDouble: return Dt::F64;
    case at::kBFloat16: return Dt::BF16;
    default:
      TORCH_CHECK(false, fn, ": argument '", name, "' has dtype ", t.scalar_type(),
                  "; supported: float32, float64, bfloat16");
  }
  return Dt::F32;
}

using Named = std::pair<const char*, const at::Tensor*>;

at::ScalarType state_type(Dt dt) { return dt == Dt::F64 ? at::kDouble : at::kFloat; }

void check_dtype(const char* fn, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, fn, ": argument '", name, "' must have dtype ", want, ", got ",
              t.scalar_type());
}

Hyper adamw_hyper(const char* fn, double lr, double beta1, double beta2, double eps, double wd, int64_t step) {
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, fn, ": beta1 must satisfy 0 <= beta1 < 1, got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, fn, ": beta2 must satisfy 0 <= beta2 < 1, got ", beta2);
  TORCH_CHECK(eps >= 0.0, fn, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(step >= 1, fn, ": step (the bias-correction count) must be >= 1, got ", step);
  Hyper h;
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.a = 1.0 / (1.0 - std::pow(beta1, static_cast<double>(step)));
  h.b = 1.0 / (1.0 - std::pow(beta2, static_cast<double>(step)));
  h.c = 1.0 - lr * wd;
  return h;
}

// ---- ops ---------------------------------------------------------------------------------------------

void check_out(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& ref, at::ScalarType want) {
  check_vec(fn, name, t, ref);
  check_dtype(fn, name, t, want);
}

// `_out` variants write into caller buffers (reused across tasks by the engine: no page faults, no allocator
// traffic). An output may be one of the inputs (in place: every lane is loaded before it is stored) but must
// not partially overlap one; the Python wrappers check that.
void inner_adamw_forward_out(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
    const at::Tensor& p2, const at::Tensor& m2, const at::Tensor& v2, double lr, double beta1, double beta2,
    double eps, double wd, int64_t step) {
  const char* fn = "inner_adamw_forward";
  for (auto [name, t] : std::initializer_list<Named>{{"p", &p}, {"g", &g}, {"m", &m}, {"v", &v}}) check_vec(fn, name, *t, p);
  const Dt dt = param_dt(fn, "p", p);
  check_dtype(fn, "g", g, p.scalar_type());
  check_dtype(fn, "m", m, state_type(dt));
  check_dtype(fn, "v", v, state_type(dt));
  check_out(fn, "out[0]", p2, p, p.scalar_type());
  check_out(fn, "out[1]", m2, p, state_type(dt));
  check_out(fn, "out[2]", v2, p, state_type(dt));
  const Hyper h = adamw_hyper(fn, lr, beta1, beta2, eps, wd, step);
  Buffers b;
  b.in[0] = p.data_ptr(); b.in[1] = g.data_ptr(); b.in[2] = m.data_ptr(); b.in[3] = v.data_ptr();
  b.out[0] = p2.data_ptr(); b.out[1] = m2.data_ptr(); b.out[2] = v2.data_ptr();
  run(Op::AdamwForward, dt, b, p.numel(), h);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> inner_adamw_forward(const at::Tensor& p, const at::Tensor& g,
    const at::Tensor& m, const at::Tensor& v, double lr, double beta1, double beta2, double eps, double wd,
    int64_t step) {
  at::Tensor p2 = new_output(p), m2 = new_output(m), v2 = new_output(v);
  inner_adamw_forward_out(p, g, m, v, p2, m2, v2, lr, beta1, beta2, eps, wd, step);
  return {p2, m2, v2};
}

void inner_adamw_adjoint_out(const at::Tensor& p_bar, const at::Tensor& m_bar, const at::Tensor& v_bar,
    const at::Tensor& g, const at::Tensor& m_new, const at::Tensor& v_new, const at::Tensor& gb,
    const at::Tensor& pb, const at::Tensor& mb, const at::Tensor& vb, double lr, double beta1, double beta2,
    double eps, double wd, int64_t step) {
  const char* fn = "inner_adamw_adjoint";
  for (auto [name, t] : std::initializer_list<Named>{{"p_bar", &p_bar}, {"m_bar", &m_bar}, {"v_bar", &v_bar}, {"g", &g},
                         {"m_new", &m_new}, {"v_new", &v_new}})
    check_vec(fn, name, *t, g);
  const Dt dt = param_dt(fn, "g", g);
  for (auto [name, t] : std::initializer_list<Named>{{"p_bar", &p_bar}, {"m_bar", &m_bar}, {"v_bar", &v_bar},
                         {"m_new", &m_new}, {"v_new", &v_new}, {"out[0]", &gb}, {"out[1]", &pb}, {"out[2]", &mb},
                         {"out[3]", &vb}}) {
    check_vec(fn, name, *t, g);
    check_dtype(fn, name, *t, state_type(dt));
  }
  const Hyper h = adamw_hyper(fn, lr, beta1, beta2, eps, wd, step);
  Buffers b;
  b.in[0] = p_bar.data_ptr(); b.in[1] = m_bar.data_ptr(); b.in[2] = v_bar.data_ptr();
  b.in[3] = g.data_ptr(); b.in[4] = m_new.data_ptr(); b.in[5] = v_new.data_ptr();
  b.out[0] = gb.data_ptr(); b.out[1] = pb.data_ptr(); b.out[2] = mb.data_ptr(); b.out[3] = vb.data_ptr();
  run(Op::AdamwAdjoint, dt, b, g.numel(), h);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> inner_adamw_adjoint(const at::Tensor& p_bar,
    const at::Tensor& m_bar, const at::Tensor& v_bar, const at::Tensor& g, const at::Tensor& m_new,
    const at::Tensor& v_new, double lr, double beta1, double beta2, double eps, double wd, int64_t step) {
  at::Tensor gb = new_output(p_bar), pb = new_output(p_bar), mb = new_output(p_bar), vb = new_output(p_bar);
  inner_adamw_adjoint_out(p_bar, m_bar, v_bar, g, m_new, v_new, gb, pb, mb, vb, lr, beta1, beta2, eps, wd, step);
  return {gb, pb, mb, vb};
}

void adamw_step_(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v, double lr,
                 double beta1, double beta2, double eps, double wd, int64_t step) {
  const char* fn = "adamw_step_";
  for (auto [name, t] : std::initializer_list<Named>{{"p", &p}, {"g", &g}, {"m", &m}, {"v", &v}}) check_vec(fn, name, *t, p);
  const Dt dt = param_dt(fn, "p", p);
  check_dtype(fn, "g", g, p.scalar_type());
  check_dtype(fn, "m", m, state_type(dt));
  check_dtype(fn, "v", v, state_type(dt));
  const Hyper h = adamw_hyper(fn, lr, beta1, beta2, eps, wd, step);
  Buffers b;
  b.in[0] = p.data_ptr(); b.in[1] = g.data_ptr(); b.in[2] = m.data_ptr(); b.in[3] = v.data_ptr();
  b.out[0] = p.data_ptr(); b.out[1] = m.data_ptr(); b.out[2] = v.data_ptr();
  run(Op::AdamwForward, dt, b, p.numel(), h);
}

at::Tensor inner_sgd_forward(const at::Tensor& p, const at::Tensor& g, double lr, double wd) {
  const char* fn = "inner_sgd_forward";
  check_vec(fn, "p", p, p);
  check_vec(fn, "g", g, p);
  const Dt dt = param_dt(fn, "p", p);
  check_dtype(fn, "g", g, p.scalar_type());
  Hyper h;
  h.lr = lr;
  h.c = 1.0 - lr * wd;
  at::Tensor p2 = new_output(p);
  Buffers b;
  b.in[0] = p.data_ptr(); b.in[1] = g.data_ptr();
  b.out[0] = p2.data_ptr();
  run(Op::SgdForward, dt, b, p.numel(), h);
  return p2;
}

std::tuple<at::Tensor, at::Tensor> inner_sgd_adjoint(const at::Tensor& p_bar, double lr, double wd) {
  const char* fn = "inner_sgd_adjoint";
  check_vec(fn, "p_bar", p_bar, p_bar);
  const Dt dt = param_dt(fn, "p_bar", p_bar);
  TORCH_CHECK(dt != Dt::BF16, fn, ": argument 'p_bar' must have a state dtype (float32 or float64), got ",
              p_bar.scalar_type());
  Hyper h;
  h.lr = lr;
  h.c = 1.0 - lr * wd;
  at::Tensor gb = new_output(p_bar), pb = new_output(p_bar);
  Buffers b;
  b.in[0] = p_bar.data_ptr();
  b.out[0] = gb.data_ptr(); b.out[1] = pb.data_ptr();
  run(Op::SgdAdjoint, dt, b, p_bar.numel(), h);
  return {gb, pb};
}

void sgd_step_(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v, double lr,
               double beta1, double beta2, double wd) {
  const char* fn = "sgd_step_";
  for (auto [name, t] : std::initializer_list<Named>{{"p", &p}, {"g", &g}, {"m", &m}, {"v", &v}}) check_vec(fn, name, *t, p);
  const Dt dt = param_dt(fn, "p", p);
  check_dtype(fn, "g", g, p.scalar_type());
  check_dtype(fn, "m", m, state_type(dt));
  check_dtype(fn, "v", v, state_type(dt));
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, fn, ": beta1 must satisfy 0 <= beta1 < 1, got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, fn, ": beta2 must satisfy 0 <= beta2 < 1, got ", beta2);
  Hyper h;
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.c = 1.0 - lr * wd;
  Buffers b;
  b.in[0] = p.data_ptr(); b.in[1] = g.data_ptr(); b.in[2] = m.data_ptr(); b.in[3] = v.data_ptr();
  b.out[0] = p.data_ptr(); b.out[1] = m.data_ptr(); b.out[2] = v.data_ptr();
  run(Op::SgdStep, dt, b, p.numel(), h);
}

void fd_perturb_out(const at::Tensor& p, const at::Tensor& d, const at::Tensor& plus, const at::Tensor& minus,
                    double r) {
  const char* fn = "fd_perturb";
  check_vec(fn, "p", p, p);
  check_vec(fn, "d", d, p);
  const Dt dt = param_dt(fn, "p", p);
  check_dtype(fn, "d", d, state_type(dt));
  check_out(fn, "out[0]", plus, p, p.scalar_type());
  check_out(fn, "out[1]", minus, p, p.scalar_type());
  Hyper h;
  h.scale = r;
  Buffers b;
  b.in[0] = p.data_ptr(); b.in[1] = d.data_ptr();
  b.out[0] = plus.data_ptr(); b.out[1] = minus.data_ptr();
  run(Op::FdPerturb, dt, b, p.numel(), h);
}

std::tuple<at::Tensor, at::Tensor> fd_perturb(const at::Tensor& p, const at::Tensor& d, double r) {
  at::Tensor plus = new_output(p), minus = new_output(p);
  fd_perturb_out(p, d, plus, minus, r);
  return {plus, minus};
}

void fd_combine_(const at::Tensor& acc, const at::Tensor& g_plus, const at::Tensor& g_minus, double scale) {
  const char* fn = "fd_combine_";
  check_vec(fn, "acc", acc, acc);
  check_vec(fn, "g_plus", g_plus, acc);
  check_vec(fn, "g_minus", g_minus, acc);
  const Dt dt = param_dt(fn, "g_plus", g_plus);
  check_dtype(fn, "g_minus", g_minus, g_plus.scalar_type());
  check_dtype(fn, "acc", acc, state_type(dt));
  Hyper h;
  h.scale = scale;
  Buffers b;
  b.in[0] = acc.data_ptr(); b.in[1] = g_plus.data_ptr(); b.in[2] = g_minus.data_ptr();
  b.out[0] = acc.data_ptr();
  run(Op::FdCombine, dt, b, acc.numel(), h);
}

}  // namespace
}  // namespace mamlen::cpu

// The schemas are defined in Python (kernels/_dispatch.py) before this library is loaded; the impl
// registration checks each function signature against its schema.
TORCH_LIBRARY_IMPL(mamlen, CPU, m) {
  using namespace mamlen::cpu;
  m.impl("inner_adamw_forward", &inner_adamw_forward);
  m.impl("inner_adamw_adjoint", &inner_adamw_adjoint);
  m.impl("adamw_step_", &adamw_step_);
  m.impl("inner_sgd_forward", &inner_sgd_forward);
  m.impl("inner_sgd_adjoint", &inner_sgd_adjoint);
  m.impl("sgd_step_", &sgd_step_);
  m.impl("fd_perturb", &fd_perturb);
  m.impl("fd_combine_", &fd_combine_);
  m.impl("inner_adamw_forward_out", &inner_adamw_forward_out);
  m.impl("inner_adamw_adjoint_out", &inner_adamw_adjoint_out);
  m.impl("fd_perturb_out", &fd_perturb_out);
}

// Which SIMD variant the kernels run (for tests and benchmark reports): torch.ops.mamlen_info.cpu_variant();
// set_cpu_variant("default" | "avx2" | "avx512") switches and returns the previous one.
TORCH_LIBRARY(mamlen_info, m) {
  m.def("cpu_variant() -> str", &mamlen::cpu::cpu_variant);
  m.def("set_cpu_variant(str name) -> str", &mamlen::cpu::set_cpu_variant);
}
