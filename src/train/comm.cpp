#include "train/comm.h"

#include <cstring>

#include "core/error.h"

namespace hm {

uint64_t bytes_hash(const void* data, size_t n, uint64_t h) {
  constexpr uint64_t kPrime = 1099511628211ULL;
  const unsigned char* p = static_cast<const unsigned char*>(data);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * kPrime;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * kPrime;
  return h;
}

void check_same_on_ranks(Comm* comm, uint64_t v, const std::string& what) {
  if (!comm || comm->size() == 1) return;
  const std::vector<uint64_t> all = comm->allgather(v);
  for (size_t r = 1; r < all.size(); ++r)
    HM_CHECK(all[r] == all[0], "data-parallel ranks disagree: rank ", r, "'s ", what, " differs from rank 0's");
}

}  // namespace hm
