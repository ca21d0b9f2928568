// The torch extension's Python binding (host code only): a thin layer from Python to the
// launchers, which live in kda_fwd.cu, kda_bwd.cu and lif_rms.cu (entry.h).
// Python (model/kernels/ops.py) allocates every tensor and fills a parameter struct
// (ctypes, mirroring sk::LifParams / KdaParams / RmsParams); each binding takes that
// struct's address and the device index, and launches on the device's current stream.
// Built just in time by model/kernels/build.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "entry.h"

namespace {

template <class P>
const P& params_at(int64_t address) {  // P is only declared here: a reference needs no definition
  TORCH_CHECK(address != 0, "null parameter struct");
  return *reinterpret_cast<const P*>(address);
}

cudaStream_t stream_of(int64_t device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

void check(const char* op, const char* err) { TORCH_CHECK(err == nullptr, "model.kernels.", op, ": ", err); }

#define SK_BIND(NAME, PARAMS, CALL)                                       \
  void NAME(int64_t address, int64_t device) {                            \
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device)); \
    const PARAMS& p = params_at<PARAMS>(address);                          \
    check(#NAME, CALL);                                                    \
  }

SK_BIND(lif_fwd, sk::LifParams, sk::entry_lif_fwd(p, stream_of(device)))
SK_BIND(lif_bwd, sk::LifParams, sk::entry_lif_bwd(p, stream_of(device)))
SK_BIND(kda_fwd, sk::KdaParams, sk::entry_kda_fwd(p, stream_of(device)))
SK_BIND(kda_bwd, sk::KdaParams, sk::entry_kda_bwd(p, stream_of(device)))
SK_BIND(rms_fwd, sk::RmsParams, sk::entry_rms_fwd(p, stream_of(device)))
SK_BIND(rms_bwd, sk::RmsParams, sk::entry_rms_bwd(p, stream_of(device)))
#undef SK_BIND

std::vector<int64_t> struct_sizes() {
  return {sk::entry_struct_size(0), sk::entry_struct_size(1), sk::entry_struct_size(2)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Spike-KDA fused CUDA kernels (see model/kernels)";
  m.def("lif_fwd", &lif_fwd, "LIF scan + alpha/beta modulation, forward");
  m.def("lif_bwd", &lif_bwd, "LIF scan + alpha/beta modulation, backward");
  m.def("kda_fwd", &kda_fwd, "KDA recurrence forward (also the one-token step)");
  m.def("kda_bwd", &kda_bwd, "KDA recurrence backward");
  m.def("rms_fwd", &rms_fwd, "gated RMSNorm forward");
  m.def("rms_bwd", &rms_bwd, "gated RMSNorm backward");
  m.def("struct_sizes", &struct_sizes, "sizeof of the parameter structs (checked against ctypes)");
}
