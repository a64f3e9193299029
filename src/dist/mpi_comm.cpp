#include "dist/mpi_comm.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"

#ifdef HM_HAVE_MPI
#include <mpi.h>
#endif
#ifdef HM_HAVE_NCCL
#include <nccl.h>

#include "backend/cuda/cuda_backend.h"
#endif

namespace hm {

int launcher_world_size() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"}) {
    if (const char* v = std::getenv(name); v && *v) {
      const long n = std::strtol(v, nullptr, 10);
      if (n > 0 && n < INT_MAX) return int(n);
    }
  }
  // PMIx launchers (OpenMPI 5, Slurm) always set the rank, not always the size.
  return std::getenv("PMIX_RANK") ? 1 : 0;
}

#ifdef HM_HAVE_MPI

namespace {

void mpi_ok(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw Error(detail::cat("MPI: ", what, " failed: ", std::string(msg, size_t(len))));
}

// MPI counts are int: longer buffers go in pieces.
constexpr int64_t kMaxCount = int64_t(1) << 30;

class MpiComm final : public Comm {
 public:
  MpiComm() {
    int provided = 0;
    // Only the main thread calls MPI (OpenMP threads compute between the calls).
    mpi_ok(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    // Errors come back as codes and become hm::Errors, which abort the job (mpi_abort).
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    mpi_ok(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank");
    mpi_ok(MPI_Comm_size(MPI_COMM_WORLD, &size_), "MPI_Comm_size");
    MPI_Comm node;
    mpi_ok(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node),
           "MPI_Comm_split_type");
    mpi_ok(MPI_Comm_rank(node, &local_rank_), "MPI_Comm_rank");
    mpi_ok(MPI_Comm_size(node, &local_size_), "MPI_Comm_size");
    MPI_Comm_free(&node);
#ifdef HM_HAVE_NCCL
    // One GPU per rank of a machine, chosen before any backend is made on the current device.
    int n = 0;
    if (cudaGetDeviceCount(&n) == cudaSuccess && n > 0) cudaSetDevice(local_rank_ % n);
#endif
  }
  ~MpiComm() override {
#ifdef HM_HAVE_NCCL
    if (reduce_) cudaStreamSynchronize(reduce_);
    if (ready_) cudaEventDestroy(ready_);
    if (summed_) cudaEventDestroy(summed_);
    if (reduce_) cudaStreamDestroy(reduce_);
    if (nccl_) ncclCommDestroy(nccl_);
#endif
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_size() const override { return local_size_; }

  void allreduce_sum(float* x, int64_t n) override { allreduce(x, n, MPI_FLOAT); }
  void allreduce_sum(double* x, int64_t n) override { allreduce(x, n, MPI_DOUBLE); }

  void allreduce_sum_device(Backend& be, float* x, int64_t n) override {
    if (be.device() == Device::CPU) return allreduce_sum(x, n);
#ifdef HM_HAVE_NCCL
    cudaStream_t compute = cuda_stream(be);
    if (!nccl_) init_nccl();
    // The sum waits for what the backend enqueued so far (this bucket's gradients), on the
    // reduction stream, while the backend's stream goes on with the rest of the backward.
    cuda_ok(cudaEventRecord(ready_, compute), "cudaEventRecord");
    cuda_ok(cudaStreamWaitEvent(reduce_, ready_, 0), "cudaStreamWaitEvent");
    nccl_ok(ncclAllReduce(x, x, size_t(n), ncclFloat32, ncclSum, nccl_, reduce_), "ncclAllReduce");
#else
    (void)x, (void)n;
    throw Error(detail::cat("allreduce of ", device_name(be.device()), " memory: this hm was built without NCCL"));
#endif
  }

  void wait_device(Backend& be) override {
    if (be.device() == Device::CPU) return;
#ifdef HM_HAVE_NCCL
    if (!nccl_) return;
    cuda_ok(cudaEventRecord(summed_, reduce_), "cudaEventRecord");
    cuda_ok(cudaStreamWaitEvent(cuda_stream(be), summed_, 0), "cudaStreamWaitEvent");
#endif
  }

  std::vector<uint64_t> allgather(uint64_t v) override {
    std::vector<uint64_t> all(size_t(size_), 0);
    mpi_ok(MPI_Allgather(&v, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD), "MPI_Allgather");
    return all;
  }

  void broadcast(void* data, int64_t n, int root) override {
    char* p = static_cast<char*>(data);
    for (int64_t off = 0; off < n; off += kMaxCount)
      mpi_ok(MPI_Bcast(p + off, int(std::min(kMaxCount, n - off)), MPI_BYTE, root, MPI_COMM_WORLD), "MPI_Bcast");
  }

  void barrier() override { mpi_ok(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier"); }

  [[noreturn]] void abort(int code) override { mpi_abort(code); }

 private:
  template <class T>
  void allreduce(T* x, int64_t n, MPI_Datatype type) {
    for (int64_t off = 0; off < n; off += kMaxCount)
      mpi_ok(MPI_Allreduce(MPI_IN_PLACE, x + off, int(std::min(kMaxCount, n - off)), type, MPI_SUM, MPI_COMM_WORLD),
             "MPI_Allreduce");
  }

#ifdef HM_HAVE_NCCL
  static void nccl_ok(ncclResult_t r, const char* what) {
    HM_CHECK(r == ncclSuccess, "NCCL: ", what, " failed: ", ncclGetErrorString(r));
  }
  static void cuda_ok(cudaError_t e, const char* what) {
    HM_CHECK(e == cudaSuccess, "CUDA: ", what, " failed: ", cudaGetErrorString(e));
  }
  static cudaStream_t cuda_stream(Backend& be) {
    auto* cb = dynamic_cast<CudaBackend*>(&be);
    HM_CHECK(cb, "allreduce: a ", device_name(be.device()), " backend that is not the CUDA one");
    return cb->stream();
  }
  void init_nccl() {
    ncclUniqueId id;
    if (rank_ == 0) nccl_ok(ncclGetUniqueId(&id), "ncclGetUniqueId");
    broadcast(&id, int64_t(sizeof id), 0);
    nccl_ok(ncclCommInitRank(&nccl_, size_, id, rank_), "ncclCommInitRank");
    cuda_ok(cudaStreamCreateWithFlags(&reduce_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    // A wait takes the event's record at the time it is enqueued, so one event per direction,
    // recorded again for every bucket, is enough.
    cuda_ok(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    cuda_ok(cudaEventCreateWithFlags(&summed_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  }
  ncclComm_t nccl_ = nullptr;
  cudaStream_t reduce_ = nullptr;
  cudaEvent_t ready_ = nullptr, summed_ = nullptr;
#endif

  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
};

}  // namespace

std::unique_ptr<Comm> mpi_world() { return std::make_unique<MpiComm>(); }

void mpi_abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

#else  // no MPI in this build

std::unique_ptr<Comm> mpi_world() {
  throw Error(detail::cat("started by an MPI launcher with ", launcher_world_size(),
                          " ranks, but this hm was built without MPI (install libopenmpi-dev: ./setup.sh, "
                          "and build again)"));
}

void mpi_abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(code);
}

#endif

}  // namespace hm
