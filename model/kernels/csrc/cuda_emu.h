// Host emulation of the small part of the CUDA thread model the kernels use, so that the
// very same kernel source can be compiled by a plain C++ compiler and checked on a CPU.
//
// Each CUDA thread of a block is a cooperative fiber (ucontext); a block runs to completion
// before the next starts, fibers switch only at synchronisation points:
//   __syncthreads / __syncthreads_count   all live threads of the block
//   __shfl_xor_sync                       the 32 threads of a warp (full mask only)
// A barrier that can never complete (threads of one warp waiting at different kinds of
// barrier, the divergence bug CUDA would hang or misbehave on) aborts with a message.
// Dynamic shared memory is poisoned with NaN before every block, so a read of shared
// memory that nothing wrote shows up as NaN. Only dynamic shared memory is supported
// (`__shared__` maps to `static`, which would leak values from one block to the next).
//
// Not a CUDA implementation: no memory model beyond "one fiber runs at a time", no warp
// divergence within a shuffle, no atomics. It exists to test indexing, reductions and
// barrier placement of the kernels on machines without a GPU.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
typedef void* cudaStream_t;

namespace emu {

enum State { RUN, WAIT_BLOCK, WAIT_WARP, DONE };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  State state = RUN;
  dim3 tid;
  int lin = 0;
  int shfl_parity = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int cur = -1;
  dim3 bid, bdim, gdim;
  std::vector<float> dyn;        // dynamic shared memory
  std::vector<uint64_t> shfl[2];  // shuffle exchange slots, double-buffered
  int count_acc = 0;
  std::function<void()> body;
};

inline Block*& current() {
  static Block* b = nullptr;
  return b;
}
inline Fiber& me() {
  Block* b = current();
  return b->fibers[b->cur];
}
inline void yield_as(State s) {
  Block* b = current();
  Fiber& f = b->fibers[b->cur];
  f.state = s;
  swapcontext(&f.ctx, &b->sched);
}
inline void trampoline() {
  Block* b = current();
  b->body();
  b->fibers[b->cur].state = DONE;  // returns to b->sched through uc_link
}

constexpr size_t kStack = 256 * 1024;

inline void run_block(dim3 grid, dim3 bid, dim3 bdim, size_t smem, const std::function<void()>& body) {
  Block blk;
  const int n = int(bdim.x * bdim.y * bdim.z);
  blk.fibers.resize(n);
  blk.bid = bid;
  blk.bdim = bdim;
  blk.gdim = grid;
  blk.dyn.assign(smem / sizeof(float) + 4, std::numeric_limits<float>::quiet_NaN());
  blk.shfl[0].assign(size_t(n) + 32, 0);
  blk.shfl[1].assign(size_t(n) + 32, 0);
  blk.body = body;
  current() = &blk;
  for (int i = 0; i < n; ++i) {
    Fiber& f = blk.fibers[i];
    f.lin = i;
    f.tid = dim3(i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y));
    f.stack.reset(new char[kStack]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &blk.sched;
    makecontext(&f.ctx, trampoline, 0);
  }
  for (;;) {
    for (int i = 0; i < n; ++i) {
      if (blk.fibers[i].state == RUN) {
        blk.cur = i;
        swapcontext(&blk.sched, &blk.fibers[i].ctx);
      }
    }
    int alive = 0, at_block = 0;
    for (auto& f : blk.fibers) {
      alive += f.state != DONE;
      at_block += f.state == WAIT_BLOCK;
    }
    if (alive == 0) break;
    if (at_block == alive) {
      for (auto& f : blk.fibers)
        if (f.state == WAIT_BLOCK) f.state = RUN;
      continue;
    }
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {
      int live = 0, waiting = 0;
      for (int i = w * 32; i < n && i < w * 32 + 32; ++i) {
        live += blk.fibers[i].state != DONE;
        waiting += blk.fibers[i].state == WAIT_WARP;
      }
      if (live > 0 && waiting == live) {
        if (live != 32 && live != n - w * 32) {
          std::fprintf(stderr, "emu: warp %d shuffles with %d live lanes\n", w, live);
          std::abort();
        }
        for (int i = w * 32; i < n && i < w * 32 + 32; ++i)
          if (blk.fibers[i].state == WAIT_WARP) blk.fibers[i].state = RUN;
        released = true;
      }
    }
    if (!released) {
      std::fprintf(stderr, "emu: deadlock in block (%u,%u,%u): threads wait at different barriers\n", bid.x, bid.y,
                   bid.z);
      std::abort();
    }
  }
  current() = nullptr;
}

template <class... KArgs, class... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(grid, dim3(x, y, z), block, smem, [&] { kernel(args...); });
}

inline float* dyn_smem() { return current()->dyn.data(); }

struct bf16 {
  uint16_t x;
};

}  // namespace emu

#define threadIdx (emu::me().tid)
#define blockIdx (emu::current()->bid)
#define blockDim (emu::current()->bdim)
#define gridDim (emu::current()->gdim)

inline void __syncthreads() { emu::yield_as(emu::WAIT_BLOCK); }

inline int __syncthreads_count(int pred) {
  emu::Block* b = emu::current();
  b->count_acc += pred ? 1 : 0;
  __syncthreads();
  const int r = b->count_acc;
  __syncthreads();
  if (emu::me().lin == 0) b->count_acc = 0;
  __syncthreads();
  return r;
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  if (mask != 0xffffffffu || width != 32) {
    std::fprintf(stderr, "emu: only full-warp shuffles are emulated\n");
    std::abort();
  }
  emu::Block* b = emu::current();
  emu::Fiber& f = emu::me();
  auto& slots = b->shfl[f.shfl_parity];
  f.shfl_parity ^= 1;  // the other buffer next time: no second barrier needed
  uint64_t out = 0;
  std::memcpy(&out, &v, sizeof(T));
  slots[f.lin] = out;
  emu::yield_as(emu::WAIT_WARP);
  const int lane = f.lin & 31;
  uint64_t in = slots[(f.lin & ~31) + (lane ^ lane_mask)];
  T r;
  std::memcpy(&r, &in, sizeof(T));
  return r;
}

inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline float __bfloat162float(emu::bf16 h) {
  uint32_t u = uint32_t(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline emu::bf16 __float2bfloat16(float f) {  // round to nearest even, like CUDA and torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return emu::bf16{uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return emu::bf16{uint16_t(u >> 16)};
}
