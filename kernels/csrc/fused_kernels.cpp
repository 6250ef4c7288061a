// The fused elementwise loops, written once on at::vec::Vectorized and compiled once per CPU capability.
//
// CMakeLists.txt builds this file three times with CPU_CAPABILITY=DEFAULT / AVX2 / AVX512 (plus the
// matching -m flags and CPU_CAPABILITY_* macro that make ATen's Vectorized use AVX2 or AVX-512). Everything
// here lives in namespace mamlen::cpu::CPU_CAPABILITY, like ATen's own vec code, so the three copies never
// share a symbol; ops.cpp calls the copy matching at::get_cpu_capability() at run time. Keep this file free of
// static initialisers of our own: they would run at load time, compiled for the variant's ISA (the only one
// the headers bring, std::ios_base::Init, is a plain call).
//
// Memory-bound loops: each element is loaded once and stored once per buffer; the arithmetic runs in the
// state dtype S (float for bf16/fp32 parameters, double for fp64), two vectors per iteration.
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <array>
#include <tuple>
#include <utility>

#include "kernels.h"

namespace mamlen::cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename S>
using Vec = at::vec::Vectorized<S>;

// Non-temporal (streaming) stores, for outputs far larger than the caches: written straight to memory, so
// the destination lines are not first read in (read-for-ownership), which is ~30% of the traffic of an
// out-of-place op. Need vector-aligned addresses; the caller issues a store fence afterwards.
#if defined(CPU_CAPABILITY_AVX512)
inline void stream(float* x, const Vec<float>& v) { _mm512_stream_ps(x, v); }
inline void stream(double* x, const Vec<double>& v) { _mm512_stream_pd(x, v); }
inline void stream(c10::BFloat16* x, const at::vec::Vectorized<c10::BFloat16>& v) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(x), v);
}
constexpr bool kCanStream = true;
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream(float* x, const Vec<float>& v) { _mm256_stream_ps(x, v); }
inline void stream(double* x, const Vec<double>& v) { _mm256_stream_pd(x, v); }
inline void stream(c10::BFloat16* x, const at::vec::Vectorized<c10::BFloat16>& v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(x), v);
}
constexpr bool kCanStream = true;
#else
template <typename T, typename V>
inline void stream(T* x, const V& v) { v.store(x); }
constexpr bool kCanStream = false;
#endif

// load / store 2 * Vec<S>::size() elements of a buffer of type T as two Vec<S>
template <typename S, typename T>
struct Lanes {
  static void load(const T* x, Vec<S>& lo, Vec<S>& hi) {
    lo = Vec<S>::loadu(x);
    hi = Vec<S>::loadu(x + Vec<S>::size());
  }
  template <bool NT>
  static void store(T* x, const Vec<S>& lo, const Vec<S>& hi) {
    if constexpr (NT) {
      stream(x, lo);
      stream(x + Vec<S>::size(), hi);
    } else {
      lo.store(x);
      hi.store(x + Vec<S>::size());
    }
  }
};
template <>
struct Lanes<float, c10::BFloat16> {  // bf16 buffers: widen to fp32 on load, round to nearest even on store
  static void load(const c10::BFloat16* x, Vec<float>& lo, Vec<float>& hi) { at::vec::load_fp32_from_bf16(x, lo, hi); }
  template <bool NT>
  static void store(c10::BFloat16* x, const Vec<float>& lo, const Vec<float>& hi) {
    const auto v = at::vec::convert_float_bfloat16(lo, hi);
    if constexpr (NT) {
      stream(x, v);
    } else {
      v.store(x);
    }
  }
};

// out_k[i] = body(in_0[i], ..., in_{NI-1}[i])_k for i in [0, n). Inputs are all loaded before any output of
// the same lanes is stored, so outputs may alias inputs. The tail (< 2 vectors) goes through zero-padded
// buffers; padded lanes may compute inf/NaN but are never written.
template <bool NT, typename S, typename Body, typename... In, typename... Out, size_t... I, size_t... J>
void drive_impl(int64_t n, const std::tuple<const In*...>& in, const std::tuple<Out*...>& out, const Body& body,
                std::index_sequence<I...>, std::index_sequence<J...>) {
  constexpr int64_t W = Vec<S>::size();
  constexpr int64_t U = 2 * W;
  constexpr size_t NI = sizeof...(In), NO = sizeof...(Out);
  std::array<Vec<S>, NI> xl, xh;
  std::array<Vec<S>, NO> yl, yh;
  int64_t i = 0;
  for (; i + U <= n; i += U) {
    (Lanes<S, In>::load(std::get<I>(in) + i, xl[I], xh[I]), ...);
    body(xl.data(), yl.data());
    body(xh.data(), yh.data());
    (Lanes<S, Out>::template store<NT>(std::get<J>(out) + i, yl[J], yh[J]), ...);
  }
  const int64_t k = n - i;
  if (k <= 0) return;
  alignas(64) S bin[NI > 0 ? NI : 1][U] = {};
  alignas(64) S bout[NO > 0 ? NO : 1][U];
  ((std::copy(std::get<I>(in) + i, std::get<I>(in) + n, bin[I])), ...);  // converts T -> S
  ((xl[I] = Vec<S>::loadu(bin[I]), xh[I] = Vec<S>::loadu(bin[I] + W)), ...);
  body(xl.data(), yl.data());
  body(xh.data(), yh.data());
  ((yl[J].store(bout[J]), yh[J].store(bout[J] + W)), ...);
  ((std::transform(bout[J], bout[J] + k, std::get<J>(out) + i, [](S x) { return static_cast<Out>(x); })), ...);
}

// `stream`: the caller's request for non-temporal stores (large out-of-place outputs); honoured when this
// variant has them and every output is vector-aligned (then each main-loop store is aligned too).
template <typename S, typename Body, typename... In, typename... Out>
void drive(int64_t n, const std::tuple<const In*...>& in, const std::tuple<Out*...>& out, const Body& body,
           bool stream) {
  constexpr uintptr_t kAlign = sizeof(Vec<S>);
  const bool aligned = std::apply(
      [](auto*... p) { return ((reinterpret_cast<uintptr_t>(p) % kAlign == 0) && ...); }, out);
  if (kCanStream && stream && aligned) {
    drive_impl<true, S>(n, in, out, body, std::index_sequence_for<In...>{}, std::index_sequence_for<Out...>{});
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    _mm_sfence();  // order the streaming stores before anything that follows (other threads included)
#endif
  } else {
    drive_impl<false, S>(n, in, out, body, std::index_sequence_for<In...>{}, std::index_sequence_for<Out...>{});
  }
}

// ---- bodies: x = inputs, y = outputs, one vector of lanes, arithmetic in S -------------------------------

// in: p, g, m, v   out: p2, m2, v2   (DESIGN.md inner step; also the in-place outer step)
template <typename S>
struct AdamwForward {
  Vec<S> beta1, omb1, beta2, omb2, b, eps, c, lr_a;
  explicit AdamwForward(const Hyper& h)
      : beta1(h.beta1), omb1(1 - h.beta1), beta2(h.beta2), omb2(1 - h.beta2), b(h.b), eps(h.eps), c(h.c),
        lr_a(h.lr * h.a) {}
  void operator()(const Vec<S>* x, Vec<S>* y) const {
    const Vec<S> g = x[1];
    const Vec<S> m2 = at::vec::fmadd(x[2], beta1, g * omb1);
    const Vec<S> v2 = at::vec::fmadd(x[3], beta2, g * g * omb2);
    const Vec<S> denom = (v2 * b).sqrt() + eps;
    y[0] = x[0] * c - lr_a * m2 / denom;
    y[1] = m2;
    y[2] = v2;
  }
};

// in: p_bar, m_bar, v_bar, g, m_new, v_new   out: g_bar, p_bar_prev, m_bar_prev, v_bar_prev
template <typename S>
struct AdamwAdjoint {
  Vec<S> beta1, omb1, beta2, two_omb2, b, eps, c, lr_a, half_lr_a_b, one, zero;
  explicit AdamwAdjoint(const Hyper& h)
      : beta1(h.beta1), omb1(1 - h.beta1), beta2(h.beta2), two_omb2(2 * (1 - h.beta2)), b(h.b), eps(h.eps),
        c(h.c), lr_a(h.lr * h.a), half_lr_a_b(0.5 * h.lr * h.a * h.b), one(1), zero(0) {}
  void operator()(const Vec<S>* x, Vec<S>* y) const {
    const Vec<S> pb = x[0];
    const Vec<S> s = (x[5] * b).sqrt();
    const Vec<S> inv_d = one / (s + eps);
    const Vec<S> m_tot = x[1] - lr_a * pb * inv_d;
    // -lr p̄ · (-a m/(s+eps)² · b/(2s)); the contract sets it to 0 where s == 0 (the 1/s lane is discarded)
    const Vec<S> dv = half_lr_a_b * pb * x[4] * inv_d * inv_d / s;
    const Vec<S> v_tot = x[2] + Vec<S>::blendv(zero, dv, s > zero);
    y[0] = at::vec::fmadd(m_tot, omb1, two_omb2 * x[3] * v_tot);
    y[1] = pb * c;
    y[2] = m_tot * beta1;
    y[3] = v_tot * beta2;
  }
};

// in: p, g   out: p2
template <typename S>
struct SgdForward {
  Vec<S> c, lr;
  explicit SgdForward(const Hyper& h) : c(h.c), lr(h.lr) {}
  void operator()(const Vec<S>* x, Vec<S>* y) const { y[0] = x[0] * c - x[1] * lr; }
};

// in: p_bar   out: g_bar, p_bar_prev
template <typename S>
struct SgdAdjoint {
  Vec<S> c, neg_lr;
  explicit SgdAdjoint(const Hyper& h) : c(h.c), neg_lr(-h.lr) {}
  void operator()(const Vec<S>* x, Vec<S>* y) const {
    y[0] = x[0] * neg_lr;
    y[1] = x[0] * c;
  }
};

// in: p, g, m, v   out: p, m, v
template <typename S>
struct SgdStep {
  Vec<S> beta1, omb1, beta2, omb2, c, lr;
  explicit SgdStep(const Hyper& h)
      : beta1(h.beta1), omb1(1 - h.beta1), beta2(h.beta2), omb2(1 - h.beta2), c(h.c), lr(h.lr) {}
  void operator()(const Vec<S>* x, Vec<S>* y) const {
    const Vec<S> g = x[1];
    y[0] = x[0] * c - g * lr;
    y[1] = at::vec::fmadd(x[2], beta1, g * omb1);
    y[2] = at::vec::fmadd(x[3], beta2, g * g * omb2);
  }
};

// in: p, d   out: p + r d, p - r d
template <typename S>
struct FdPerturb {
  Vec<S> r;
  explicit FdPerturb(const Hyper& h) : r(h.scale) {}
  void operator()(const Vec<S>* x, Vec<S>* y) const {
    const Vec<S> rd = x[1] * r;
    y[0] = x[0] + rd;
    y[1] = x[0] - rd;
  }
};

// in: acc, g_plus, g_minus   out: acc
template <typename S>
struct FdCombine {
  Vec<S> scale;
  explicit FdCombine(const Hyper& h) : scale(h.scale) {}
  void operator()(const Vec<S>* x, Vec<S>* y) const { y[0] = at::vec::fmadd(x[1] - x[2], scale, x[0]); }
};

template <typename P, typename S>
void run_typed(Op op, const Buffers& B, int64_t i0, int64_t n, const Hyper& h) {
  auto ip = [&](int k) { return static_cast<const P*>(B.in[k]) + i0; };
  auto is = [&](int k) { return static_cast<const S*>(B.in[k]) + i0; };
  auto op_ = [&](int k) { return static_cast<P*>(B.out[k]) + i0; };
  auto os = [&](int k) { return static_cast<S*>(B.out[k]) + i0; };
  switch (op) {
    case Op::AdamwForward:
      drive<S>(n, std::make_tuple(ip(0), ip(1), is(2), is(3)), std::make_tuple(op_(0), os(1), os(2)),
               AdamwForward<S>(h), h.stream);
      break;
    case Op::AdamwAdjoint:
      drive<S>(n, std::make_tuple(is(0), is(1), is(2), ip(3), is(4), is(5)),
               std::make_tuple(os(0), os(1), os(2), os(3)), AdamwAdjoint<S>(h), h.stream);
      break;
    case Op::SgdForward:
      drive<S>(n, std::make_tuple(ip(0), ip(1)), std::make_tuple(op_(0)), SgdForward<S>(h), h.stream);
      break;
    case Op::SgdAdjoint:
      drive<S>(n, std::make_tuple(is(0)), std::make_tuple(os(0), os(1)), SgdAdjoint<S>(h), h.stream);
      break;
    case Op::SgdStep:
      drive<S>(n, std::make_tuple(ip(0), ip(1), is(2), is(3)), std::make_tuple(op_(0), os(1), os(2)),
               SgdStep<S>(h), h.stream);
      break;
    case Op::FdPerturb:
      drive<S>(n, std::make_tuple(ip(0), is(1)), std::make_tuple(op_(0), op_(1)), FdPerturb<S>(h), h.stream);
      break;
    case Op::FdCombine:
      drive<S>(n, std::make_tuple(is(0), ip(1), ip(2)), std::make_tuple(os(0)), FdCombine<S>(h), h.stream);
      break;
  }
}

}  // namespace

void run_chunk(Op op, Dt dt, const Buffers& B, int64_t begin, int64_t end, const Hyper& h) {
  const int64_t n = end - begin;
  switch (dt) {
    case Dt::F32: run_typed<float, float>(op, B, begin, n, h); break;
    case Dt::F64: run_typed<double, double>(op, B, begin, n, h); break;
    case Dt::BF16: run_typed<c10::BFloat16, float>(op, B, begin, n, h); break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace mamlen::cpu
