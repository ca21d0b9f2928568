// KDA backward kernels (every head dim and dtype variant); see kda.cuh.
#include "entry.h"
#include "kda.cuh"

const char* sk::entry_kda_bwd(const KdaParams& p, cudaStream_t stream) { return kda_run<true>(p, stream); }
