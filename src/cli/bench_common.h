// What hm bench's CPU and CUDA modes share (cmd_bench.cpp, bench_cuda.cpp): the statistic, the
// GEMM FLOP count of a forward, child processes, and the aligned table.
#pragma once
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "model/config.h"
#include "model/params.h"
#include "runtime/memory.h"

namespace hm {
class HybridModel;
}

namespace hm::cli {

// Every timing is the median of --reps runs after warm-up, as the peers' (statistics.median: the
// middle two averaged for an even count).
double median(std::vector<double> v);

// Multiply-add FLOPs of the matrix products of a forward over T tokens in n_seqs sequences
// that produces logits for `rows` rows (the part a GEMM floor bounds; scan, conv, norms and
// attention scores are counted separately below and are small at these lengths).
double forward_gemm_flops(const ModelConfig& c, const Params& p, double T, double rows);

// The value of a /proc/cpuinfo field for the first processor ("model name", "flags"), or
// "unknown": the machine a figure was measured on (hm bench, hm info --system).
std::string cpuinfo_value(const std::string& key);

// Runs a shell command; its exit status and standard output.
std::pair<int, std::string> run_capture_status(const std::string& cmd);
// The same, hm::Error when it exits non-zero.
std::string run_capture(const std::string& cmd);

// One line of the table `hm bench` prints without --json. `rate`: higher is better (tok/s);
// otherwise a time. Missing figures are NaN and print as "-".
struct Row {
  std::string test, unit;
  double ours, floor = NAN, peer = NAN;
  bool rate = false;
};
std::string cell(double v, const char* suffix = "");
// An aligned table like llama-bench's: one row per measurement; "of floor" is the fraction of
// the machine's floor reached (floor time / ours, or ours / roofline rate), "vs peer" how many
// times faster than the peer.
void print_rows(const std::vector<Row>& rows, FILE* out = stdout);

struct DeviceSetup;
// hm bench on a device backend (bench_device.cpp): prefill, time to first token, decode, device
// memory and the floors, and with `peer` mamba_ssm on the same weights (bench/cuda_peer.py).
struct DeviceBenchOptions {
  std::string preset = "seed", config, model, peer_script;
  bool peer = false, json = false, quick = false;
  std::string decode_cases;   // "BxC,...": only these decode cases (batch x context), no prefill cases
  std::string prefill_cases;  // "BxL,...": only these prefill cases (batch x tokens), no decode cases
  int reps = 5;
};
int bench_device(const DeviceBenchOptions& o, DeviceSetup& dev);
// The device's floors, as cuda_peer.py measures them: the backend's bf16 linear at 8192^3
// ("gemm_bf16_tflops") and a 1 GiB device-to-device copy ("copy_gb_s", bytes read + written).
nlohmann::json measure_device_floors(Backend& be, int reps);
// Decode of each BATCHxCONTEXT case ("64x16,1x4096"), as the device bench times it (Generator,
// greedy: ttft_ms = T(1), ms_per_step = (T(129) - T(1)) / 128, tok_s = batch / ms_per_step), on
// the model's backend: batched decoding on the CPU.
nlohmann::json bench_decode_cases(HybridModel& m, const std::string& spec, KvType kv, int reps);

}  // namespace hm::cli
