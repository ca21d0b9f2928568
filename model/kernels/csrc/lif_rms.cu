// LIF + modulation and gated RMSNorm kernels; see lif.cuh and rmsnorm.cuh.
#include "entry.h"
#include "kda.cuh"
#include "lif.cuh"
#include "rmsnorm.cuh"

const char* sk::entry_lif_fwd(const LifParams& p, cudaStream_t stream) { return lif_fwd(p, stream); }
const char* sk::entry_lif_bwd(const LifParams& p, cudaStream_t stream) { return lif_bwd(p, stream); }
const char* sk::entry_rms_fwd(const RmsParams& p, cudaStream_t stream) { return rms_run(p, false, stream); }
const char* sk::entry_rms_bwd(const RmsParams& p, cudaStream_t stream) { return rms_run(p, true, stream); }
int64_t sk::entry_struct_size(int which) {
  return which == 0 ? sizeof(LifParams) : which == 1 ? sizeof(KdaParams) : sizeof(RmsParams);
}
