// CUDA backend entry point. The interface and the build option exist so the model code is
// written once; the kernels arrive with the CUDA issue. Until then asking for the device is an
// error that says so, never a silent fallback.
#include <memory>

#include "backend/backend.h"
#include "core/error.h"

namespace hm {
std::unique_ptr<Backend> make_cuda_backend() {
  throw Error("cuda: the CUDA backend is not implemented yet; every hm command runs on the CPU backend");
}
}  // namespace hm
