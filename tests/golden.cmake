# Golden logits: the PyTorch peer (bench/torch_peer.py) computes reference logits for a checkpoint
# written by `hm init`, and the Golden* gtests compare the engine against them.
# Chain: golden_init -> golden_torch -> golden_compare, linked by CTest fixtures, so
# `ctest -R golden_compare` (or any run that selects it) regenerates its inputs first.
set(HM_TORCH_PYTHON /usr/bin/python3 CACHE FILEPATH "Python interpreter with PyTorch (Debian python3-torch) for the golden tests")
set(HM_GOLDEN_DIR ${CMAKE_BINARY_DIR}/golden/tiny)

add_test(NAME golden_init
  COMMAND $<TARGET_FILE:hm> init --preset tiny --seed 7 --out ${HM_GOLDEN_DIR})
set_tests_properties(golden_init PROPERTIES FIXTURES_SETUP golden_model)

add_test(NAME golden_torch
  COMMAND ${HM_TORCH_PYTHON} ${CMAKE_SOURCE_DIR}/bench/torch_peer.py golden
          --model ${HM_GOLDEN_DIR} --out ${HM_GOLDEN_DIR}/golden.safetensors)
set_tests_properties(golden_torch PROPERTIES FIXTURES_REQUIRED golden_model FIXTURES_SETUP golden_logits)

# Whole-model gradients against PyTorch autograd (float64). A write-random copy of the tiny
# config gives nonzero bridge gates, so every bridge gradient is exercised.
set(HM_GOLDEN_GRAD_DIR ${CMAKE_BINARY_DIR}/golden/tiny_grad)
add_test(NAME golden_grad_model
  COMMAND ${HM_TORCH_PYTHON} ${CMAKE_SOURCE_DIR}/bench/torch_peer.py write-random
          --config ${HM_GOLDEN_DIR}/config.json --out ${HM_GOLDEN_GRAD_DIR} --seed 1)
set_tests_properties(golden_grad_model PROPERTIES FIXTURES_REQUIRED golden_model FIXTURES_SETUP golden_grad_ckpt)
add_test(NAME golden_grad_torch
  COMMAND ${HM_TORCH_PYTHON} ${CMAKE_SOURCE_DIR}/bench/torch_peer.py grads
          --model ${HM_GOLDEN_GRAD_DIR} --out ${HM_GOLDEN_GRAD_DIR}/grads.safetensors)
set_tests_properties(golden_grad_torch PROPERTIES FIXTURES_REQUIRED golden_grad_ckpt FIXTURES_SETUP golden_grads)

# True Hybrid (docs/TRUE_HYBRID.md): the true-tiny preset's config (Mamba, true, Mamba, attention
# with a bridge, true), written by write-random with the router, fusion scales and exchange moved
# off their inits, in each routing mode and once with chunk granularity (hard, chunks of 3 and 14
# tokens: the split prefill ends mid-chunk). Logits for each; float64 gradients for soft and hard.
set(HM_GOLDEN_TRUE_DIR ${CMAKE_BINARY_DIR}/golden/true_tiny)
add_test(NAME golden_true_init
  COMMAND $<TARGET_FILE:hm> init --preset true-tiny --seed 7 --out ${HM_GOLDEN_TRUE_DIR})
set_tests_properties(golden_true_init PROPERTIES FIXTURES_SETUP golden_true_model)
set(HM_GOLDEN_TRUE_soft "{\"routing_mode\": \"soft\"}")
set(HM_GOLDEN_TRUE_hard "{\"routing_mode\": \"hard\"}")
set(HM_GOLDEN_TRUE_both "{\"routing_mode\": \"both\"}")
set(HM_GOLDEN_TRUE_chunk "{\"routing_mode\": \"hard\", \"routing_granularity\": \"chunk\"}")
foreach(v soft hard both chunk)
  set(dir ${HM_GOLDEN_TRUE_DIR}_${v})
  add_test(NAME golden_true_${v}_model
    COMMAND ${HM_TORCH_PYTHON} ${CMAKE_SOURCE_DIR}/bench/torch_peer.py write-random
            --config ${HM_GOLDEN_TRUE_DIR}/config.json --override ${HM_GOLDEN_TRUE_${v}}
            --out ${dir} --seed 1)
  set_tests_properties(golden_true_${v}_model PROPERTIES FIXTURES_REQUIRED golden_true_model
    FIXTURES_SETUP golden_true_${v}_ckpt)
  add_test(NAME golden_true_${v}_torch
    COMMAND ${HM_TORCH_PYTHON} ${CMAKE_SOURCE_DIR}/bench/torch_peer.py golden
            --model ${dir} --out ${dir}/golden.safetensors --len 14)
  set_tests_properties(golden_true_${v}_torch PROPERTIES FIXTURES_REQUIRED golden_true_${v}_ckpt
    FIXTURES_SETUP golden_true_logits)
endforeach()
foreach(v soft hard)
  set(dir ${HM_GOLDEN_TRUE_DIR}_${v})
  add_test(NAME golden_true_${v}_grads
    COMMAND ${HM_TORCH_PYTHON} ${CMAKE_SOURCE_DIR}/bench/torch_peer.py grads
            --model ${dir} --out ${dir}/grads.safetensors)
  set_tests_properties(golden_true_${v}_grads PROPERTIES FIXTURES_REQUIRED golden_true_${v}_ckpt
    FIXTURES_SETUP golden_true_grads)
endforeach()

# The Golden* gtests (their own binary, tests/golden/) run after their fixtures.
add_test(NAME golden_compare
  COMMAND $<TARGET_FILE:hm_golden_tests>)
set_tests_properties(golden_compare PROPERTIES
  FIXTURES_REQUIRED "golden_logits;golden_grads;golden_true_logits;golden_true_grads"
  ENVIRONMENT "OMP_NUM_THREADS=2")
