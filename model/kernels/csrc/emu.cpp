// Host build of the kernels for tests on machines without a GPU (model/kernels/emu.py):
// the same headers, compiled with KERNELS_EMU by a plain C++ compiler, run by the fiber
// emulator in cuda_emu.h. Each export takes the parameter struct Python filled and
// returns nullptr or an error message.
#define KERNELS_EMU 1
#include "kda.cuh"
#include "lif.cuh"
#include "rmsnorm.cuh"

extern "C" {
const char* emu_lif_fwd(const sk::LifParams* p) { return sk::lif_fwd(*p, nullptr); }
const char* emu_lif_bwd(const sk::LifParams* p) { return sk::lif_bwd(*p, nullptr); }
const char* emu_kda_fwd(const sk::KdaParams* p) { return sk::kda_run<false>(*p, nullptr); }
const char* emu_kda_bwd(const sk::KdaParams* p) { return sk::kda_run<true>(*p, nullptr); }
const char* emu_rms_fwd(const sk::RmsParams* p) { return sk::rms_run(*p, false, nullptr); }
const char* emu_rms_bwd(const sk::RmsParams* p) { return sk::rms_run(*p, true, nullptr); }
void emu_struct_sizes(int64_t* out) {
  out[0] = sizeof(sk::LifParams);
  out[1] = sizeof(sk::KdaParams);
  out[2] = sizeof(sk::RmsParams);
}
void emu_kda_constants(int64_t* out) {
  out[0] = sk::kRows;
  out[1] = sk::kThreads;
  out[2] = sk::kChunk;
}
}
