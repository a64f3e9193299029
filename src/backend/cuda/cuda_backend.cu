// CUDA backend entry point. The kernels exist (src/kernels/cuda/, tested against kernels/ref);
// the backend that runs the model on them needs the typed, ragged interface of docs/CUDA.md.
// Until then asking for the device is an error that says so, never a silent fallback.
#include <memory>

#include "backend/backend.h"
#include "core/error.h"

namespace hm {
std::unique_ptr<Backend> make_cuda_backend() {
  throw Error("cuda: the CUDA backend is not implemented yet; every hm command runs on the CPU backend");
}
}  // namespace hm
