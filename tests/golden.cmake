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

# The Golden* gtests (their own binary, tests/golden/) run after their fixtures.
add_test(NAME golden_compare
  COMMAND $<TARGET_FILE:hm_golden_tests>)
set_tests_properties(golden_compare PROPERTIES FIXTURES_REQUIRED golden_logits
  ENVIRONMENT "OMP_NUM_THREADS=2")
