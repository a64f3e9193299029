// The collectives data-parallel training needs (docs/DISTRIBUTED.md): one process per rank, each
// computing the gradient of its shard of the global batch; the gradients are summed across ranks
// so every rank takes the same optimizer step. The trainer sees only this interface: the MPI
// implementation (dist/mpi_comm.h, with NCCL for device buffers) lives in the hm binary, so the
// core library and the Python module do not link MPI.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace hm {

class Backend;

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Ranks on this machine (a default thread count divides the cores among them).
  virtual int local_size() const = 0;
  // In place: every rank's x becomes the element-wise sum over ranks, identical on every rank.
  virtual void allreduce_sum(float* x, int64_t n) = 0;
  virtual void allreduce_sum(double* x, int64_t n) = 0;
  // The same for n floats in `be`'s memory, ordered after the work `be` has enqueued so far. On a
  // GPU it returns at once (NCCL on a stream of its own, so the backward goes on beside it);
  // wait_device(be) orders be's later work after every such sum. On a host backend: at once.
  virtual void allreduce_sum_device(Backend& be, float* x, int64_t n) = 0;
  virtual void wait_device(Backend& be) = 0;
  // Every rank's v, in rank order, on every rank.
  virtual std::vector<uint64_t> allgather(uint64_t v) = 0;
  // Rank `root`'s bytes on every rank (the receivers' buffers hold n bytes already).
  virtual void broadcast(void* data, int64_t n, int root = 0) = 0;
  virtual void barrier() = 0;
  // Ends every rank of the job now (a rank that cannot go on while the others may be waiting
  // for it in a collective). Does not return.
  [[noreturn]] virtual void abort(int code) = 0;
};

// Watches a data-parallel run from a thread of its own: when no beat() came for `timeout`
// seconds, it prints what it waited for and calls comm.abort(1). Inactive with timeout <= 0.
class Watchdog {
 public:
  Watchdog(Comm& comm, double timeout_s);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  // Progress: restarts the clock; `what` names what comes next ("step 12").
  void beat(const std::string& what);

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// A 64-bit hash of n bytes (FNV-1a's step over 8-byte words, then the tail's bytes): what the
// ranks compare to check that they hold the same settings, data and weights.
uint64_t bytes_hash(const void* data, size_t n, uint64_t h = 1469598103934665603ULL);

// Sums a gradient arena across ranks in fixed buckets of `bucket` floats taken from the end of the
// arena down (the order the backward finishes them: head and final norm, the last layer, ...,
// the embedding), each bucket sent as soon as the backward reports it done (done(), e.g. from
// BatchGrad's grads-done callback) so the sums overlap the rest of the backward. finish() sends
// what is left and orders the backend's later work after all of it. The buckets and their
// order depend only on the arena's size, so every rank issues the same collectives even when
// its part of a batch had nothing to compute.
class GradReducer {
 public:
  // be: the backend holding grads (null: host memory, summed by Comm::allreduce_sum).
  GradReducer(Comm& comm, Backend* be, float* grads, int64_t numel, int64_t bucket = int64_t(6) << 20);
  // Gradients at [begin, end) are final; end is where the previous call began (numel at first).
  void done(int64_t begin, int64_t end);
  void finish();
  int buckets_sent() const { return sent_; }

 private:
  void send_down_to(int64_t frontier);
  Comm& comm_;
  Backend* be_;
  float* g_;
  int64_t numel_, bucket_, next_hi_, frontier_;
  int sent_ = 0;
};

// Checks that every rank passed the same v; otherwise hm::Error (on every rank) naming `what`
// and the first rank that differs from rank 0. comm may be null (one process).
void check_same_on_ranks(Comm* comm, uint64_t v, const std::string& what);

}  // namespace hm
