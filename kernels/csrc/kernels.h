// Interface between ops.cpp (checks, allocation, threading, registration) and fused_kernels.cpp (the SIMD
// loops, compiled once per CPU capability into namespaces DEFAULT / AVX2 / AVX512). Plain types only: this
// header must not pull in ATen's vector headers, whose meaning depends on the capability macros.
#pragma once
#include <cstdint>

namespace mamlen::cpu {

enum class Op : int { AdamwForward, AdamwAdjoint, SgdForward, SgdAdjoint, SgdStep, FdPerturb, FdCombine };

// parameter dtype P and state dtype S = promote(P, float32) of a call
enum class Dt : int { F32, F64, BF16 };

// scalars of every op; each op reads the ones it needs (a, b: bias corrections; c = 1 - lr*wd)
struct Hyper {
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, a = 1, b = 1, c = 1, scale = 0;
  bool stream = false;  // non-temporal stores for the outputs (set for large out-of-place calls)
};

// up to 6 inputs and 4 outputs, in the order the op's body documents; outputs may alias inputs (in place)
struct Buffers {
  const void* in[6] = {};
  void* out[4] = {};
};

// run `op` on elements [begin, end) of every buffer, single-threaded
using RunChunk = void (*)(Op, Dt, const Buffers&, int64_t begin, int64_t end, const Hyper&);

namespace DEFAULT { void run_chunk(Op, Dt, const Buffers&, int64_t, int64_t, const Hyper&); }
namespace AVX2 { void run_chunk(Op, Dt, const Buffers&, int64_t, int64_t, const Hyper&); }
namespace AVX512 { void run_chunk(Op, Dt, const Buffers&, int64_t, int64_t, const Hyper&); }

}  // namespace mamlen::cpu
