# Fuzz targets (docs/RELIABILITY.md, "Fuzzing and sanitizers"). Each tests/fuzz/fuzz_NAME.cpp
# defines LLVMFuzzerTestOneInput. The test suite links it with replay_main.cpp into
# fuzz_replay_NAME and replays the seed corpus (tests/fuzz/corpus/NAME) and every input that
# once crashed it (tests/fuzz/regressions/NAME); HM_FUZZ also links it with libFuzzer into
# fuzz_NAME, which scripts/fuzz.sh runs.
set(HM_FUZZ_TARGETS safetensors config tokenizer text_regex trainer_state chat_template)
foreach(t ${HM_FUZZ_TARGETS})
  if(HM_BUILD_TESTS)
    add_executable(fuzz_replay_${t} tests/fuzz/fuzz_${t}.cpp tests/fuzz/replay_main.cpp)
    target_link_libraries(fuzz_replay_${t} PRIVATE hm_core)
    file(GLOB inputs CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/fuzz/corpus/${t}/*
         ${CMAKE_SOURCE_DIR}/tests/fuzz/regressions/${t}/*)
    add_test(NAME fuzz_replay_${t} COMMAND fuzz_replay_${t} ${inputs})
    set_tests_properties(fuzz_replay_${t} PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")
  endif()
  if(HM_FUZZ)
    add_executable(fuzz_${t} tests/fuzz/fuzz_${t}.cpp)
    target_link_libraries(fuzz_${t} PRIVATE hm_core)
    target_link_options(fuzz_${t} PRIVATE -fsanitize=fuzzer)
  endif()
endforeach()
# hm serve's request parsing lives in hm_server.
if(HM_BUILD_TESTS)
  add_executable(fuzz_replay_server_request tests/fuzz/fuzz_server_request.cpp tests/fuzz/replay_main.cpp)
  target_link_libraries(fuzz_replay_server_request PRIVATE hm_server)
  file(GLOB inputs CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/fuzz/corpus/server_request/*
       ${CMAKE_SOURCE_DIR}/tests/fuzz/regressions/server_request/*)
  add_test(NAME fuzz_replay_server_request COMMAND fuzz_replay_server_request ${inputs})
endif()
if(HM_FUZZ)
  add_executable(fuzz_server_request tests/fuzz/fuzz_server_request.cpp)
  target_link_libraries(fuzz_server_request PRIVATE hm_server)
  target_link_options(fuzz_server_request PRIVATE -fsanitize=fuzzer)
endif()
