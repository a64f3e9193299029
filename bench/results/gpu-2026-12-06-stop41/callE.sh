#!/usr/bin/env bash
# Stop 41, callE (after callD, same warm H100 and carry): the skinny GEMM against cuBLASLt and the
# GEMV on this card (`hm_bench_cuda_kernels skinny`), and the 130M shape's decode against
# mamba_ssm (stop 40's callC.sh). Ran as one command line; this file records it.
. bench/device_env.sh; timeout 60 $H/bin/hm_bench_cuda_kernels skinny 2>&1 | grep -E "device|skinny " | sed -E 's/ +/ /g'; SHAPES="mamba-130m" timeout 150 bash bench/results/gpu-2026-12-06-stop40/callC.sh 2>&1 | tail -5
