// Data parallelism across processes through MPI (docs/DISTRIBUTED.md): `mpirun -np N hm train
// ...` starts one process per rank; this is the Comm (train/comm.h) they share. Host buffers are
// summed by MPI_Allreduce; device buffers (a GPU's gradients) by NCCL, whose communicator the
// ranks bootstrap through MPI the first time one is summed. Built when CMake finds MPI (HM_MPI).
#pragma once
#include <memory>

#include "train/comm.h"

namespace hm {

// The world size an MPI launcher (OpenMPI's mpirun, MPICH's Hydra, Slurm's PMI or PMIx) put in
// this process's environment; 0 when it was not started by one.
int launcher_world_size();

// MPI_Init and the world communicator, for a process started by an MPI launcher. Each rank uses
// GPU local_rank (mod the devices present) when this build has CUDA. hm::Error when this hm was
// built without MPI. MPI_Finalize when the Comm is destroyed.
std::unique_ptr<Comm> mpi_world();

// Ends every rank of the job (MPI_Abort), so that none waits forever in a collective for a rank
// that failed; called after the failing rank printed its error.
[[noreturn]] void mpi_abort(int code);

}  // namespace hm
