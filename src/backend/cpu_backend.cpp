// CPU backend: the fast kernels of kernels/cpu behind the Backend interface (host_backend.h).
#include "backend/host_backend.h"

#ifdef HM_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

namespace hm {

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

Device device_from_name(const std::string& name) {
  if (name == "cpu") return Device::CPU;
  if (name == "cuda") return Device::CUDA;
  throw Error(detail::cat("device must be cpu or cuda, got '", name, "'"));
}

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<HostBackend<false>>(); }

std::unique_ptr<Backend> make_backend(Device d) {
  if (d == Device::CPU) return make_cpu_backend();
#ifdef HM_HAVE_CUDA
  return make_cuda_backend();
#else
  throw Error("cuda: this build has no CUDA backend (configure with -DHM_CUDA=ON)");
#endif
}

bool cuda_available() {
#ifdef HM_HAVE_CUDA
  return cuda_available_impl();
#else
  return false;
#endif
}

std::vector<Device> compiled_devices() {
#ifdef HM_HAVE_CUDA
  return {Device::CPU, Device::CUDA};
#else
  return {Device::CPU};
#endif
}

}  // namespace hm
