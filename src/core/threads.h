// One thread count for the whole engine: OpenMP (our kernels) and OpenBLAS (linear) are set
// together, so that neither oversubscribes the cores the other is using. BLAS is only ever
// called from outside OpenMP parallel regions.
#pragma once

namespace hm {

// n <= 0 restores the default: the number of hardware threads.
void set_num_threads(int n);
// The count the next parallel region will use.
int num_threads();

}  // namespace hm
