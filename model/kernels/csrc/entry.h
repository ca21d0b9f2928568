// Host entry points of the extension, one per launcher, defined in the .cu files
// (kda_fwd.cu, kda_bwd.cu, lif_rms.cu) so that ninja compiles them in parallel, and
// called by the host-only binding (binding.cpp). Each returns nullptr or an error message.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace sk {
struct LifParams;
struct KdaParams;
struct RmsParams;
const char* entry_lif_fwd(const LifParams& p, cudaStream_t stream);
const char* entry_lif_bwd(const LifParams& p, cudaStream_t stream);
const char* entry_kda_fwd(const KdaParams& p, cudaStream_t stream);
const char* entry_kda_bwd(const KdaParams& p, cudaStream_t stream);
const char* entry_rms_fwd(const RmsParams& p, cudaStream_t stream);
const char* entry_rms_bwd(const RmsParams& p, cudaStream_t stream);
int64_t entry_struct_size(int which);  // 0 Lif, 1 Kda, 2 Rms
}  // namespace sk
