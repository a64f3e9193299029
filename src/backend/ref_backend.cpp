// The reference backend: kernels/ref behind the Backend interface. Slow and plain; it is the
// oracle that tests run whole models and every other backend's ops against.
#include "backend/host_backend.h"

namespace hm {

std::unique_ptr<Backend> make_ref_backend() { return std::make_unique<HostBackend<true>>(); }

}  // namespace hm
