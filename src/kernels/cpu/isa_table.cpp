// This ISA's kernel table (dispatch.h); compiled once per ISA like the kernels it lists.
#include "kernels/cpu/dispatch.h"

namespace hm::cpu::HM_ISA_NS {

HM_DECLARE_KERNELS
void linear_rows(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k, bool accumulate);
extern const int kLinearRowsMax;
namespace grad { HM_DECLARE_GRAD_KERNELS }

KernelTable kernel_table() {
  return {rmsnorm, conv1d_silu, selective_scan, rope, attention, attention_f16kv, store_f16, swiglu, relu2, exp_sum, linear_rows, kLinearRowsMax,
          {grad::scan_forward, grad::scan_backward, grad::ssd_backward, grad::conv1d_silu_backward,
           grad::softmax_causal_row, grad::softmax_grad_row, grad::cross_entropy_row}};
}

}  // namespace hm::cpu::HM_ISA_NS
