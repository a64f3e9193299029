# Golden logits and gradients: the PyTorch peer (bench/torch_peer.py) writes a random checkpoint
# for a config (write-random: every parameter random, A_log and D per channel and layer, norm
# weights, bridge gates, router and fusion off their inits), computes reference logits (full
# forward, token by token, split prefill) or float64 gradients for it, and the Golden* gtests
# compare the engine against them. Chains of CTest fixtures, so `ctest -R golden_compare` (or
# any run that selects it) regenerates its inputs first.
set(HM_TORCH_PYTHON /usr/bin/python3 CACHE FILEPATH "Python interpreter with PyTorch (Debian python3-torch) for the golden tests")
set(HM_GOLDEN ${CMAKE_BINARY_DIR}/golden)
set(HM_PEER ${CMAKE_SOURCE_DIR}/bench/torch_peer.py)

# Every preset's layer structure: `hm init`'s config.json (its weights are deleted unread). The
# folder goes first: hm init refuses to overwrite a model, and a rerun finds last run's.
set(HM_GOLDEN_PRESETS tiny true-tiny seed mamba transformer demo true-hybrid true-demo)
foreach(p ${HM_GOLDEN_PRESETS})
  add_test(NAME golden_config_${p}
    COMMAND sh -c "rm -rf \"$2\" && \"$0\" init --preset $1 --dtype BF16 --out \"$2\" > /dev/null && rm \"$2/model.safetensors\""
            $<TARGET_FILE:hm> ${p} ${HM_GOLDEN}/config/${p})
  set_tests_properties(golden_config_${p} PROPERTIES FIXTURES_SETUP golden_config_${p})
endforeach()

# hm_golden(NAME PRESET OVERRIDE SEED LEN): a write-random checkpoint of PRESET's config with the
# fields in OVERRIDE replaced, in golden/NAME, and the peer's logits for it (2 x LEN tokens).
function(hm_golden name preset override seed len)
  set(dir ${HM_GOLDEN}/${name})
  add_test(NAME golden_${name}_model
    COMMAND ${HM_TORCH_PYTHON} ${HM_PEER} write-random --config ${HM_GOLDEN}/config/${preset}/config.json
            --override ${override} --out ${dir} --seed ${seed})
  set_tests_properties(golden_${name}_model PROPERTIES FIXTURES_REQUIRED golden_config_${preset}
    FIXTURES_SETUP golden_${name}_ckpt)
  add_test(NAME golden_${name}_torch
    COMMAND ${HM_TORCH_PYTHON} ${HM_PEER} golden --model ${dir} --out ${dir}/golden.safetensors --len ${len})
  set_tests_properties(golden_${name}_torch PROPERTIES FIXTURES_REQUIRED golden_${name}_ckpt
    FIXTURES_SETUP golden_logits)
endfunction()

# hm_golden_grads(NAME): float64 loss and gradients of golden/NAME's checkpoint.
function(hm_golden_grads name)
  set(dir ${HM_GOLDEN}/${name})
  add_test(NAME golden_${name}_grads
    COMMAND ${HM_TORCH_PYTHON} ${HM_PEER} grads --model ${dir} --out ${dir}/grads.safetensors)
  set_tests_properties(golden_${name}_grads PROPERTIES FIXTURES_REQUIRED golden_${name}_ckpt
    FIXTURES_SETUP golden_grads)
endfunction()

# Simple Hybrid presets. tiny as it is; the others at test size (width 32, vocabulary 300,
# state 8, an MLP of 48 where the preset has one), their layer structure kept: seed (attention
# at 3/6/9 of 12), mamba (12 Mamba layers), transformer (8 attention + MLP), demo (attention at
# 2 and 5 of 6). Gradients for tiny (every bridge gate nonzero, so every bridge gradient counts).
set(HM_SHRINK "\"d_model\": 32, \"vocab_size\": 300, \"d_state\": 8")
hm_golden(tiny tiny "{}" 1 32)
hm_golden(seed seed "{${HM_SHRINK}}" 1 32)
hm_golden(mamba mamba "{${HM_SHRINK}}" 1 32)
hm_golden(transformer transformer "{${HM_SHRINK}, \"d_ff\": 48}" 1 32)
hm_golden(demo demo "{${HM_SHRINK}}" 1 32)
hm_golden_grads(tiny)

# True Hybrid (docs/TRUE_HYBRID.md): the true-tiny preset's config (Mamba, true, Mamba, attention
# with a bridge, true) in each routing mode and once with chunk granularity (hard, chunks of 3
# and 14 tokens: the split prefill ends mid-chunk); the true-hybrid and true-demo presets (hard
# routing) at test size. Float64 gradients for soft and hard. A hard route on a logit within
# rounding of 0 could go either way on the two sides: the seeds keep every |logit| >= 1e-3.
hm_golden(true_tiny_soft true-tiny "{\"routing_mode\": \"soft\"}" 1 14)
hm_golden(true_tiny_hard true-tiny "{\"routing_mode\": \"hard\"}" 1 14)
hm_golden(true_tiny_both true-tiny "{\"routing_mode\": \"both\"}" 1 14)
hm_golden(true_tiny_chunk true-tiny "{\"routing_mode\": \"hard\", \"routing_granularity\": \"chunk\"}" 1 14)
hm_golden(true_hybrid true-hybrid "{${HM_SHRINK}}" 1 14)
hm_golden(true_demo true-demo "{${HM_SHRINK}}" 1 14)
hm_golden_grads(true_tiny_soft)
hm_golden_grads(true_tiny_hard)

# The Golden* gtests (their own binary, tests/golden/) run after their fixtures.
add_test(NAME golden_compare
  COMMAND $<TARGET_FILE:hm_golden_tests>)
set_tests_properties(golden_compare PROPERTIES
  FIXTURES_REQUIRED "golden_logits;golden_grads"
  ENVIRONMENT "OMP_NUM_THREADS=2")
