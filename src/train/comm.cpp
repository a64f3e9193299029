#include "train/comm.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

#include "backend/backend.h"
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

GradReducer::GradReducer(Comm& comm, Backend* be, float* grads, int64_t numel, int64_t bucket)
    : comm_(comm), be_(be), g_(grads), numel_(numel), bucket_(bucket), next_hi_(numel), frontier_(numel) {
  HM_CHECK(bucket > 0, "GradReducer: bucket must be > 0");
}

void GradReducer::done(int64_t begin, int64_t end) {
  HM_CHECK(end == frontier_ && begin >= 0 && begin <= end, "GradReducer: gradients reported done at [", begin, ", ",
           end, ") after [", frontier_, ", ...): the backward must report them from the end of the arena down");
  frontier_ = begin;
  send_down_to(frontier_);
}

void GradReducer::send_down_to(int64_t frontier) {
  // Bucket k covers [numel - (k+1) * bucket, numel - k * bucket), clipped at 0.
  while (next_hi_ > 0 && std::max<int64_t>(0, next_hi_ - bucket_) >= frontier) {
    const int64_t lo = std::max<int64_t>(0, next_hi_ - bucket_);
    if (be_)
      comm_.allreduce_sum_device(*be_, g_ + lo, next_hi_ - lo);
    else
      comm_.allreduce_sum(g_ + lo, next_hi_ - lo);
    ++sent_;
    next_hi_ = lo;
  }
}

void GradReducer::finish() {
  frontier_ = 0;
  send_down_to(0);
  if (be_) comm_.wait_device(*be_);
}

struct Watchdog::State {
  Comm& comm;
  double timeout;
  std::mutex mu;
  std::condition_variable cv;
  std::chrono::steady_clock::time_point last;
  std::string what;
  bool stop = false;
  std::thread thread;
  State(Comm& c, double t) : comm(c), timeout(t), last(std::chrono::steady_clock::now()) {}

  void run() {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      const auto deadline = last + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                       std::chrono::duration<double>(timeout));
      if (cv.wait_until(lock, deadline, [&] { return stop || std::chrono::steady_clock::now() >= deadline; })) {
        if (stop) return;
        if (std::chrono::steady_clock::now() < last + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                          std::chrono::duration<double>(timeout)))
          continue;  // a beat came in the meantime
        std::fflush(stdout);
        std::fprintf(stderr,
                     "hm: error on rank %d of %d: %s made no progress for %g s: another rank is stuck or gone, "
                     "or a collective hangs; ending the job (--dist-timeout)\n",
                     comm.rank(), comm.size(), what.c_str(), timeout);
        comm.abort(1);
      }
    }
  }
};

Watchdog::Watchdog(Comm& comm, double timeout_s) {
  if (timeout_s <= 0) return;
  s_ = std::make_unique<State>(comm, timeout_s);
  s_->what = "the run's start";
  s_->thread = std::thread([st = s_.get()] { st->run(); });
}

Watchdog::~Watchdog() {
  if (!s_) return;
  {
    std::lock_guard<std::mutex> lock(s_->mu);
    s_->stop = true;
  }
  s_->cv.notify_all();
  s_->thread.join();
}

void Watchdog::beat(const std::string& what) {
  if (!s_) return;
  {
    std::lock_guard<std::mutex> lock(s_->mu);
    s_->last = std::chrono::steady_clock::now();
    s_->what = what;
  }
  s_->cv.notify_all();
}

void check_same_on_ranks(Comm* comm, uint64_t v, const std::string& what) {
  if (!comm || comm->size() == 1) return;
  const std::vector<uint64_t> all = comm->allgather(v);
  for (size_t r = 1; r < all.size(); ++r)
    HM_CHECK(all[r] == all[0], "data-parallel ranks disagree: rank ", r, "'s ", what, " differs from rank 0's");
}

}  // namespace hm
