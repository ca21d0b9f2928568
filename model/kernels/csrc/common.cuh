// Shared by every kernel: the CUDA / host-emulation switch, dtype helpers, reductions and
// the launcher. Kernels take one plain parameter struct of raw pointers, strides (in
// elements) and sizes, filled in Python; they never see a torch type, so the same source
// compiles with nvcc (the extension) and with a plain C++ compiler (KERNELS_EMU, tests).
// Three compilers read these headers: nvcc (the extension, build.py), NVRTC (run-time
// compilation with no CUDA toolkit, nvrtc.py: device code only, no system or CUDA headers,
// so the host launchers sit under SK_HOST and bf16 is a plain struct) and a host C++
// compiler (KERNELS_EMU, tests).
#pragma once

#ifdef __CUDACC_RTC__
#define SK_HOST 0
namespace sk {
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
}  // namespace sk
#else
#define SK_HOST 1
#include <cstdint>
#endif

#ifdef KERNELS_EMU
#include "cuda_emu.h"
#elif SK_HOST
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#endif

namespace sk {

#ifdef KERNELS_EMU
using bf16 = emu::bf16;
#elif SK_HOST
using bf16 = __nv_bfloat16;
#else
struct bf16 {  // NVRTC: the bits of a bfloat16, converted by hand (round to nearest even, like CUDA)
  uint16_t x;
};
__device__ __forceinline__ float __bfloat162float(bf16 h) { return __uint_as_float(uint32_t(h.x) << 16); }
__device__ __forceinline__ bf16 __float2bfloat16(float f) {
  uint32_t u = __float_as_uint(f);
  bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.x = uint16_t(0x7fc0);
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    r.x = uint16_t(u >> 16);
  }
  return r;
}
#endif

// dtype codes shared with Python (model/kernels/ops.py)
constexpr int64_t kFloat32 = 0;
constexpr int64_t kBFloat16 = 1;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float x) {
  return __float2bfloat16(x);
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

constexpr unsigned kFull = 0xffffffffu;

// Sum over the lanes whose index differs only in the bits FIRST, 2*FIRST, ..., 16
// (every lane ends with the sum of its group).
template <int FIRST>
__device__ __forceinline__ float lane_sum_high(float x) {
#pragma unroll
  for (int m = FIRST; m < 32; m <<= 1) x += __shfl_xor_sync(kFull, x, m);
  return x;
}

// Sum over the lanes whose index differs only in the bits below WIDTH (WIDTH a power of 2).
template <int WIDTH>
__device__ __forceinline__ float lane_sum_low(float x) {
#pragma unroll
  for (int m = WIDTH / 2; m >= 1; m >>= 1) x += __shfl_xor_sync(kFull, x, m);
  return x;
}

// Reduce-scatter of N values per lane over the lanes differing in the bits M, M/2, ..., 1:
// afterwards x[0 .. N/(2M)) of each lane hold sums over that lane group, for entries
// off .. off + N/(2M) of the original arrays (off accumulates per lane). N/2 + N/4 + ...
// shuffles instead of N * log2(2M) for an all-reduce of every value.
template <int M, int N>
__device__ __forceinline__ void lane_reduce_scatter(float* x, int lane, int& off) {
  if constexpr (M >= 1) {
    static_assert(N >= 2, "more lanes than values");
    constexpr int HALF = N / 2;
    const bool upper = (lane & M) != 0;
#pragma unroll
    for (int j = 0; j < HALF; ++j) {
      const float send = upper ? x[j] : x[j + HALF];
      const float keep = upper ? x[j + HALF] : x[j];
      x[j] = keep + __shfl_xor_sync(kFull, send, M);
    }
    if (upper) off += HALF;
    lane_reduce_scatter<M / 2, HALF>(x, lane, off);
  }
}

__device__ __forceinline__ void load8(const float* p, float* out) {  // p 32-byte aligned (shared memory)
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

#if SK_HOST
// Launch a kernel; returns nullptr or an error message.
template <class... KArgs, class... Args>
inline const char* launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args... args) {
#ifdef KERNELS_EMU
  (void)stream;
  emu::launch(kernel, grid, block, smem, args...);
  return nullptr;
#else
  if (smem > 48 * 1024) {  // opt in to more than the default 48 KB (idempotent, cheap)
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  kernel<<<grid, block, smem, stream>>>(args...);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
#endif
}
#endif  // SK_HOST

}  // namespace sk

#ifdef KERNELS_EMU
#define SK_DYNAMIC_SMEM(name) float* name = emu::dyn_smem()
#else
#define SK_DYNAMIC_SMEM(name)                   \
  extern __shared__ float4 name##_raw_smem[]; \
  float* name = reinterpret_cast<float*>(name##_raw_smem)
#endif
