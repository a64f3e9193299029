// hm bench: the numbers of docs/PERFORMANCE.md, all measured in one run so ratios hold on a
// noisy shared machine. The PyTorch peer runs the same checkpoint with the same threads.
#include <omp.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>

#include "backend/backend.h"
#include "backend/counting_backend.h"
#include "cli/bench_common.h"
#include "cli/bench_weights.h"
#include "cli/commands.h"
#include "cli/device.h"
#include "cli/memory_guard.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "kernels/cpu/dispatch.h"
#include "core/rng.h"
#include "core/threads.h"
#include "model/model.h"
#include "runtime/tokenizer.h"
#include "train/device_run.h"
#include "train/model_grad.h"
#include "train/optimizer.h"

#ifndef HM_SOURCE_DIR
#define HM_SOURCE_DIR "."
#endif

namespace hm::cli {
namespace {

using Clock = std::chrono::steady_clock;
double ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
// CPU time of the whole process (all threads), ms: on a shared machine it is far less disturbed
// by other processes than wall time (time a thread is preempted is not counted; time it spins
// at a barrier waiting for a preempted peer is).
double process_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) * 1e3 + double(ts.tv_nsec) / 1e6;
}
// The machine a figure was measured on: CPU model (/proc/cpuinfo) and L3 size (sysfs), so that
// a bandwidth labelled DRAM can be checked against the cache it must exceed.
std::string cpu_model_name() { return cpuinfo_value("model name"); }

// Bytes of the largest level-3 cache cpu0 sees, 0 when sysfs does not say.
int64_t l3_cache_bytes() {
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level(dir + "level"), size(dir + "size");
    int lv = 0;
    std::string sz;
    if (!(level >> lv) || lv != 3 || !(size >> sz) || sz.empty()) continue;
    const int64_t unit = sz.back() == 'K' ? 1024 : sz.back() == 'M' ? 1024 * 1024 : sz.back() == 'G' ? 1 << 30 : 1;
    try {
      return std::stoll(sz) * unit;
    } catch (const std::exception&) {
      return 0;
    }
  }
  return 0;
}

// MemAvailable from /proc/meminfo, 0 when unknown.
int64_t available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  for (std::string key; f >> key;) {
    int64_t kb = 0;
    f >> kb;
    if (key == "MemAvailable:") return kb * 1024;
    f.ignore(1 << 20, '\n');
  }
  return 0;
}

// The read-bandwidth probe's working set: 4 x L3 and at least 1 GiB, so that a sweep cannot be
// served from cache (a 256 MiB probe inside a 260 MiB L3 swung from 37 to 70 GB/s), at most a
// quarter of the available memory.
size_t dram_probe_bytes(int64_t l3) {
  int64_t b = std::max<int64_t>(int64_t(1) << 30, 4 * l3);
  const int64_t avail = available_memory_bytes();
  if (avail > 0) b = std::min(b, avail / 4);
  return size_t(b) & ~size_t(4095);
}

// The sum of a[0, n), n a multiple of 64: 64 independent lanes (four AVX-512 registers), bound by
// memory, not by an add chain. Cloned per ISA and chosen at load time: compiled for baseline
// x86-64 alone, the 64 lanes spill out of the 16 SSE registers and the probe reads slower.
[[gnu::target_clones("avx512f", "avx2", "default")]] float sum_floats(const float* a, size_t n) {
  float acc[64] = {};
  for (size_t i = 0; i < n; i += 64)
    for (int j = 0; j < 64; ++j) acc[j] += a[i + size_t(j)];
  float total = 0;
  for (float x : acc) total += x;
  return total;
}

// Sustained DRAM read bandwidth: a vectorized sum over `bytes`, best of 5 (a roofline is the
// peak the machine allows, so the best run, as STREAM reports).
double measure_read_gbs(size_t bytes) {
  const size_t n = bytes / sizeof(float) / 64 * 64;
  std::unique_ptr<float[]> a(new float[n]);
#pragma omp parallel for
  for (size_t i = 0; i < n; ++i) a[i] = float(i & 7);
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < 5; ++r) {
    auto t0 = Clock::now();
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
      const size_t blocks = n / 64, nt = size_t(omp_get_num_threads()), id = size_t(omp_get_thread_num());
      const size_t b0 = blocks * id / nt, b1 = blocks * (id + 1) / nt;  // this thread's share
      total += sum_floats(a.get() + b0 * 64, (b1 - b0) * 64);
    }
    const double s = ms(t0, Clock::now()) / 1e3;
    sink = sink + float(total);
    best = std::max(best, double(n * sizeof(float)) / s / 1e9);
  }
  return best;
}

// The GEMM rate our linear layers get: backend linear at 1024^3 (OpenBLAS sgemm, or the per-row
// kernel in blocks: kernels/cpu/dispatch.h, LinearLarge), best of several.
double measure_gemm_gflops(Backend& be) {
  const int n = 1024;
  std::vector<float> a(size_t(n) * n), b(size_t(n) * n), c(size_t(n) * n);
  Rng rng(7);
  for (auto& x : a) x = rng.uniform(-1.f, 1.f);
  for (auto& x : b) x = rng.uniform(-1.f, 1.f);
  double best = 0;
  for (int r = 0; r < 6; ++r) {
    auto t0 = Clock::now();
    be.linear(Tensor(c.data(), DType::F32, n, n), Tensor(a.data(), DType::F32, n, n),
              Tensor(b.data(), DType::F32, n, n), false);
    best = std::max(best, 2.0 * n * n * n / (ms(t0, Clock::now()) / 1e3) / 1e9);
  }
  return best;
}

// Model FLOPs of one training step (forward + backward) per token at sequence length L: the work
// the model needs, independent of how either implementation schedules it. Counted as
//  - matrix products: 6 per weight of every linear map a token passes through (2 forward, 4
//    backward: input and weight gradients), i.e. every 2-D weight except the embedding table
//    (a lookup), plus the head's V x d_model (the tied table counts once, as the head). Norm
//    weights, biases, A_log, D and gates are vectors: no multiply per weight worth counting.
//  - causal depthwise conv (Mamba): 2 x E x K forward, twice that backward: 6 E K.
//  - selective scan (Mamba), per token and (channel e, state n), exp counted as one FLOP:
//    forward  dA = exp(delta*A) 2, dB*x 1, s = dA*s + dBx 2, y += C*s 2            = 7
//    backward dy*C into ds 2, dC += dy*s 2, ds*s_prev (dA's grad) 1, ds*dA carried 1,
//             delta's grad through exp 2, dB += ds*dx 2, d(delta*x) += ds*B 2      = 12
//    so 19 E N per token per Mamba layer.
//  - attention scores (per attention layer, head dims summing to d_model): Q K^T and P V are
//    2 x ctx x d_model each forward, twice that backward: 12 x ctx x d_model. We take ctx = L
//    as the PaLM MFU convention does (dense L x L work); a kernel that skips the masked half
//    does ~ (L+1)/2 of it, so this overstates useful work by < 2% of the total at L <= 256.
// Softmax, RMSNorm, SiLU and the loss are left out (elementwise, a few per activation).
double train_flops_per_token(const ModelConfig& c, const Params& p, int L) {
  double matrix = 0;
  for (const auto& s : p.specs())
    if (s.shape.size() == 2 && s.name.find("embeddings") == std::string::npos && s.name != "lm_head.weight")
      matrix += double(s.numel());
  matrix += double(c.vocab_size) * c.d_model;
  double f = 6.0 * matrix;
  const double E = c.d_inner(), N = c.d_state, K = c.d_conv;
  for (int i = 0; i < c.n_layers; ++i) {
    if (c.has_attention_path(i)) f += 12.0 * L * c.d_model;
    if (c.has_mamba_path(i)) f += 6.0 * E * K + 19.0 * E * N;
  }
  return f;
}

// Uniform over the vocabulary, as the peer's torch.randint(0, V) (the cost does not depend on
// which tokens).
std::vector<int32_t> random_tokens(Rng& rng, int n, int vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng.next_u64() % uint64_t(vocab));
  return t;
}

int32_t argmax(const float* x, int n) { return int32_t(std::max_element(x, x + n) - x); }

// Prefill `len` tokens into slot 0 in chunks of `chunk`, as generation does.
void prefill(HybridModel& m, HybridMemory& mem, const std::vector<int32_t>& toks, int chunk,
             std::vector<float>& logits) {
  for (size_t i = 0; i < toks.size(); i += size_t(chunk)) {
    Batch b;
    b.add(0, std::vector<int32_t>(toks.begin() + long(i), toks.begin() + long(std::min(toks.size(), i + size_t(chunk)))));
    m.forward(b, mem, logits);
  }
}

// Runs a command, returns its exit status and peak RSS in MB (from wait4's rusage).
std::pair<int, double> run_child(const std::vector<std::string>& argv, bool quiet) {
  pid_t pid = fork();
  HM_CHECK(pid >= 0, "bench: fork failed");
  if (pid == 0) {
    if (quiet) {
      FILE* f = std::freopen("/dev/null", "w", stdout);
      (void)f;
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  int status = 0;
  struct rusage ru {};
  wait4(pid, &status, 0, &ru);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, double(ru.ru_maxrss) / 1024.0};
}


// hm bench --routing-sweep (docs/TRUE_HYBRID.md, "Routing sweep"): does skipping a path in hard
// routing save the time its FLOPs promise? One sequence of L random tokens, one prefill forward
// (last-token logits), with the routes forced to send a fraction f of the tokens to attention,
// against routing_mode "both" (every token runs both paths). FLOPs are counted by the counting
// backend on an untimed run, which also warms up; times are the median of `reps` runs, the runs
// of all configurations interleaved so that the machine's drift hits each alike.
//   saving_realized_f = (t_both - t_f) / (t_both * (F_both - F_f) / F_both)
// 1 means the time fell exactly as much as the FLOPs did.
nlohmann::json routing_sweep(const HybridModel& src, Backend& cpu_be, int L, int reps, KvType kv, bool quiet) {
  const ModelConfig& c = src.config();
  HM_CHECK(!c.true_layers.empty(), "bench --routing-sweep: the model has no true-hybrid layers (use "
           "--preset true-hybrid or a true-hybrid checkpoint)");
  HM_CHECK(L >= 1 && reps >= 1, "bench --routing-sweep: needs --seq-len >= 1 and --reps >= 1");
  CountingBackend be(cpu_be);
  ModelConfig hc = c, bc = c;
  hc.routing_mode = "hard";
  bc.routing_mode = "both";
  HybridModel hard(hc, be), both(bc, be);
  std::copy_n(src.params().data(), src.params().numel(), hard.params().data());
  std::copy_n(src.params().data(), src.params().numel(), both.params().data());
  hard.prepare();
  both.prepare();
  Rng rng(4242);
  const std::vector<int32_t> toks = random_tokens(rng, L, c.vocab_size);
  HybridMemory mem(be, c, 1, L, kv);
  std::vector<float> logits;
  const std::vector<double> fracs = {0.0, 0.25, 0.5, 0.75, 1.0};
  const int n_cfg = int(fracs.size()) + 1;  // the last one is "both"
  std::vector<std::vector<double>> cpu(static_cast<size_t>(n_cfg));
  auto run = [&](int k) {
    HybridModel& m = k < int(fracs.size()) ? hard : both;
    if (k < int(fracs.size())) m.set_forced_attention_fraction(fracs[size_t(k)]);
    mem.seq_rm(0);
    Batch b;
    b.add(0, toks);
    const double c0 = process_cpu_ms();
    auto t0 = Clock::now();
    m.forward(b, mem, logits);
    const double wall = ms(t0, Clock::now());
    cpu[size_t(k)].push_back(process_cpu_ms() - c0);
    return wall;
  };
  std::vector<double> flops(static_cast<size_t>(n_cfg));
  std::vector<nlohmann::json> by_op(static_cast<size_t>(n_cfg));
  for (int k = 0; k < n_cfg; ++k) {  // untimed: counts, and warms allocations and caches
    be.reset();
    run(k);
    cpu[size_t(k)].clear();
    flops[size_t(k)] = be.total_flops();
    for (int op = 0; op < int(OpKind::kCount); ++op)
      if (be.count(OpKind(op)).calls > 0) by_op[size_t(k)][op_kind_name(OpKind(op))] = be.count(OpKind(op)).flops;
  }
  std::vector<std::vector<double>> t(static_cast<size_t>(n_cfg));
  std::vector<std::vector<nlohmann::json>> op_ms(static_cast<size_t>(n_cfg));  // per run
  for (int rep = 0; rep < reps; ++rep) {
    if (!quiet) std::fprintf(stderr, "bench: routing sweep, repetition %d of %d...\n", rep + 1, reps);
    for (int k = 0; k < n_cfg; ++k) {
      be.reset();
      const double tk = run(k);
      // Time inside backend ops by kind; what remains is host glue (route decisions, index lists).
      nlohmann::json j;
      double in_ops = 0;
      for (int op = 0; op < int(OpKind::kCount); ++op) {
        const OpCount& oc = be.count(OpKind(op));
        if (oc.calls == 0) continue;
        j[op_kind_name(OpKind(op))] = oc.seconds * 1e3;
        in_ops += oc.seconds * 1e3;
      }
      j["host_glue"] = tk - in_ops;
      op_ms[size_t(k)].push_back(j);
      t[size_t(k)].push_back(tk);
    }
  }
  auto med = [&](int k) { return median(t[size_t(k)]); };
  auto med_cpu = [&](int k) { return median(cpu[size_t(k)]); };
  // The per-op split of the run at the median (the lower middle one for an even count).
  auto median_run_ops = [&](int k) {
    std::vector<size_t> idx(t[size_t(k)].size());
    std::iota(idx.begin(), idx.end(), size_t(0));
    std::sort(idx.begin(), idx.end(), [&](size_t x, size_t y) { return t[size_t(k)][x] < t[size_t(k)][y]; });
    return op_ms[size_t(k)][idx[(idx.size() - 1) / 2]];
  };
  const double tb = med(n_cfg - 1), fb = flops[size_t(n_cfg - 1)], cb = med_cpu(n_cfg - 1);
  nlohmann::json r, rows = nlohmann::json::array();
  double realized = 1e30, realized_cpu = 1e30;
  for (size_t k = 0; k < fracs.size(); ++k) {
    const double tf = med(int(k)), ff = flops[k], cf = med_cpu(int(k));
    const double flop_saving = (fb - ff) / fb, time_saving = (tb - tf) / tb;
    const double sr = time_saving / flop_saving, sr_cpu = (cb - cf) / cb / flop_saving;
    if (fracs[k] < 1.0) {
      realized = std::min(realized, sr);
      realized_cpu = std::min(realized_cpu, sr_cpu);
    }
    rows.push_back({{"f", fracs[k]}, {"time_ms", tf}, {"cpu_ms", cf},
                    {"saving_realized_cpu_f", sr_cpu}, {"flops", ff},
                    {"gflop_s", ff / tf / 1e6}, {"flop_saving", flop_saving}, {"time_saving", time_saving},
                    {"saving_realized_f", sr}, {"flops_by_op", by_op[k]}, {"ms_by_op", median_run_ops(int(k))}});
  }
  r["seq_len"] = L;
  r["reps"] = reps;
  r["timing"] = "median of reps, after one untimed run";
  r["both"] = {{"time_ms", tb}, {"cpu_ms", cb}, {"flops", fb},
               {"gflop_s", fb / tb / 1e6}, {"flops_by_op", by_op[size_t(n_cfg - 1)]},
               {"ms_by_op", median_run_ops(n_cfg - 1)}};
  r["fractions"] = rows;
  r["saving_realized"] = realized;  // min over f = 0, 0.25, 0.5, 0.75
  r["saving_realized_cpu"] = realized_cpu;  // the same from process CPU time
  return r;
}

// The CPU bench's header, then its rows (print_rows).
void print_table(const nlohmann::json& r, const std::vector<Row>& rows) {
  std::printf("model %s: %.3g M parameters (%.3g MB), %d threads, KV cache %s\n", r["preset"].get<std::string>().c_str(),
              r["params"].get<double>() / 1e6, r["weight_mb"].get<double>(), r["threads"].get<int>(),
              r["kv_type"].get<std::string>().c_str());
  std::printf("CPU %s (%s kernels), L3 %.0f MiB; each figure the median of %d runs after 1 warm-up%s\n\n",
              r["cpu_model"].get<std::string>().c_str(), r.value("cpu_isa", std::string("?")).c_str(), r["l3_mb"].get<double>(), r["reps"].get<int>(),
              r.contains("torch_version") ? (", peer: PyTorch " + r["torch_version"].get<std::string>()).c_str() : "");
  print_rows(rows);
}

double num(const nlohmann::json& r, const char* key) { return r.contains(key) ? r[key].get<double>() : NAN; }

// hm bench --train --device cuda (issue 15): timed steps of hm train's device path (BatchGrad in
// the compute type over float32 master weights, Backend::adamw_step with clipping) on random
// tokens, model FLOP/s and MFU against the bf16 GEMM rate measured in the same run, the peak of
// the backend's allocations; with --peer, mamba_ssm's MambaLMHeadModel trained by PyTorch (bf16
// autocast, fused AdamW: bench/cuda_peer.py train) on the same weights and shape; with --profile,
// every op of some more steps timed (synchronized) and summed by kind.
struct DeviceTrainBench {
  ModelConfig config;
  std::string name, peer_script;
  int batch = 8, seq_len = 2048, steps = 5, reps = 5;
  bool profile = false, json = false, peer = false;
};

int bench_train_device(const DeviceTrainBench& o, DeviceSetup& dev) {
  namespace fs = std::filesystem;
  HM_CHECK(o.batch >= 1 && o.seq_len >= 2 && o.steps >= 1,
           "bench: --train needs --batch >= 1, --seq-len >= 2 and --steps >= 1");
  auto log = [&](const std::string& what) { std::fprintf(stderr, "bench: %s...\n", what.c_str()); };
  const ModelConfig& c = o.config;
  const int B = o.batch, L = o.seq_len, V = c.vocab_size;
  Backend& real = *dev.be;
  CountingBackend counting(real);
  Backend& be = o.profile ? static_cast<Backend&>(counting) : real;
  Params P(c);
  init_params(P, 1234);
  AdamWConfig oc;
  oc.lr = 1e-4f;
  AdamW opt(P, oc);
  Rng rng(42);
  std::vector<int32_t> tokens = random_tokens(rng, B * L, V), targets(tokens.size());
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < L; ++t) targets[size_t(b * L + t)] = t + 1 < L ? tokens[size_t(b * L + t + 1)] : -1;
  nlohmann::json r;
  r["tool"] = "hm bench --train --device";
  r["device"] = device_name(dev.device());
  r["model"] = o.name;
  r["params"] = P.numel();
  r["dtype"] = compute_dtype_name(dev.dtype);
  r["batch"] = B;
  r["seq_len"] = L;
  r["steps"] = o.steps;
  real.reset_peak();
  log("model on the device");
  DeviceRun run(be, dev.dtype, false, P, opt);
  auto one_step = [&] {
    run.zero_grads();
    run.bg->loss_and_grad(run.g.f32(), tokens.data(), targets.data(), B, L);
    run.step(opt, oc.lr);
    be.synchronize();
  };
  log("training steps");
  std::vector<double> step_ms;
  for (int s = 0; s < o.steps + 1; ++s) {  // step 0 warms allocations, cuBLAS and the workspace
    const auto t0 = Clock::now();
    one_step();
    if (s > 0) step_ms.push_back(ms(t0, Clock::now()));
    if (o.profile && s == 0) counting.reset();
  }
  if (o.profile) {  // the timed steps ran through the counter too (each op synchronized)
    nlohmann::json ops;
    double total = 0;
    for (int k = 0; k < int(OpKind::kCount); ++k) total += counting.count(OpKind(k)).seconds;
    for (int k = 0; k < int(OpKind::kCount); ++k) {
      const OpCount& oc2 = counting.count(OpKind(k));
      if (oc2.calls == 0) continue;
      ops[op_kind_name(OpKind(k))] = {{"ms_per_step", oc2.seconds * 1e3 / o.steps},
                                      {"calls_per_step", double(oc2.calls) / o.steps},
                                      {"share", oc2.seconds / total}};
    }
    r["profile"] = ops;
  }
  const double step = median(step_ms), tok = double(B) * L;
  r["train_step_ms"] = step;
  r["train_tok_s"] = tok / (step / 1e3);
  r["peak_mem_bytes"] = double(real.peak_allocated_bytes());
  const double fpt = train_flops_per_token(c, P, L);
  r["train_flops_per_token"] = fpt;
  r["model_tflops"] = fpt * tok / (step / 1e3) / 1e12;
  log("floors");
  r["floors"] = measure_device_floors(real, o.reps);
  r["mfu"] = r["model_tflops"].get<double>() / r["floors"].at("gemm_bf16_tflops").get<double>();
  if (o.peer) {
    char tmpl[] = "/tmp/hm-bench-train-XXXXXX";
    HM_CHECK(mkdtemp(tmpl) != nullptr, "bench: cannot create a temporary directory");
    const std::string dir = tmpl;
    save_params(P, dir + "/model.safetensors");
    save_config(dir + "/config.json", c);
    log("mamba_ssm + PyTorch peer (training)");
    const auto [rc, out] = run_capture_status("python3 " + shell_quote(o.peer_script) + " train --ckpt " +
                                              shell_quote(dir) + " --batch " + std::to_string(B) + " --seq-len " +
                                              std::to_string(L) + " --json " + shell_quote(dir + "/peer.json") + " 2>&1");
    try {
      std::ifstream f(dir + "/peer.json");
      HM_CHECK(f.good(), "the peer wrote no peer.json (exit ", rc, "): ", out.substr(out.size() > 1500 ? out.size() - 1500 : 0));
      const nlohmann::json pj = nlohmann::json::parse(f);
      r["peer"] = pj;
      r["vs_peer_tok_s"] = r["train_tok_s"].get<double>() / pj.at("tok_s").get<double>();
      r["vs_peer_memory"] = r["peak_mem_bytes"].get<double>() / pj.at("peak_mem_bytes").get<double>();
    } catch (const std::exception& e) {
      r["peer"] = {{"error", e.what()}};
    }
    fs::remove_all(dir);
  }
  if (o.json) {
    std::printf("%s\n", r.dump().c_str());
  } else {
    std::printf("%s\n", r.dump(1).c_str());
  }
  return 0;
}

}  // namespace

Run add_bench(CLI::App& app) {
  struct Opts {
    std::string preset = "seed", config, model, peer = std::string(HM_SOURCE_DIR) + "/bench/torch_peer.py";
    int threads = 0, reps = 5;
    DeviceOptions dev;
    bool json = false, no_peer = false, quick = false;
    bool train = false, routing_sweep = false, profile = false;
    int batch = 8, seq_len = 128, steps = 5;
    std::string weights, decode_cases, prefill_cases;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--preset", o->preset, "Preset to measure (random weights)")->capture_default_str();
  app.add_option("--config", o->config, "A config.json to measure (random weights) instead of a preset");
  app.add_option("--model", o->model, "Measure this checkpoint instead of a preset");
  app.add_option("--threads,-t", o->threads, "Threads for us and the peer (0 = all cores)")->capture_default_str();
  app.add_option("--reps", o->reps, "Repetitions per timing (median reported)")->capture_default_str();
  CLI::Option* peer_opt =
      app.add_option("--peer", o->peer, "Path of the PyTorch peer script. --device cuda: run mamba_ssm on the same "
                     "weights only when given, PATH naming bench/cuda_peer.py (default: beside the default)")
          ->capture_default_str()->expected(0, 1);
  add_device_options(app, o->dev, true);
  app.add_flag("--json", o->json, "Print one JSON object");
  app.add_flag("--no-peer", o->no_peer, "Skip the PyTorch peer");
  app.add_flag("--quick", o->quick, "Contexts up to 1024 only (for smoke tests)");
  app.add_option("--decode-cases", o->decode_cases,
                 "Only these decode cases, BATCHxCONTEXT comma-separated (e.g. 64x16,16x8192): batched decode tok/s "
                 "and time to first token, no prefill cases (on cuda: for A/B runs and profiles of one case)");
  app.add_option("--prefill-cases", o->prefill_cases,
                 "--device cuda: only these prefill cases, BATCHxTOKENS comma-separated (e.g. 1x52,8x2048): time and "
                 "the host's time inside the forward call, no decode cases unless --decode-cases");
  app.add_flag("--train", o->train, "Measure training steps (loss_and_grad + AdamW) instead of inference");
  app.add_option("--batch", o->batch, "--train: sequences per step")->capture_default_str();
  CLI::Option* seq_len_opt =
      app.add_option("--seq-len", o->seq_len, "--train: tokens per sequence (--routing-sweep: 2048 unless given)")
          ->capture_default_str();
  app.add_flag("--routing-sweep", o->routing_sweep,
               "True hybrid: prefill time and counted FLOPs at forced attention fractions 0..1 against routing_mode both");
  app.add_option("--steps", o->steps, "--train: timed steps (after one warm-up step)")->capture_default_str();
  app.add_flag("--profile", o->profile, "--train --device cuda: also time every op of the steps (each op synchronized: "
               "a per-op table, slower steps) after the timed ones");
  app.add_option("--weights", o->weights, "Comma-separated weight formats, e.g. f32,bf16,f16,q8_0,q4_0: decode and "
                 "prefill of the model with its linear weights in each, in one run (cpu)");
  add_max_memory(app);
  app.footer("--device cuda measures prefill, time to first token, decode, device memory and the floors on the GPU "
             "(and mamba_ssm with --peer); with --json the table goes to stderr.");
  return [o, seq_len_opt, peer_opt] {
    namespace fs = std::filesystem;
    if (o->threads > 0) set_num_threads(o->threads);
    const int threads = num_threads();
    HM_CHECK(o->model.empty() || o->config.empty(), "bench: give --model or --config, not both");
    DeviceSetup dev = open_device(o->dev);
    if (dev.device() != Device::CPU && o->train) {
      DeviceTrainBench t;
      t.config = !o->model.empty() ? load_any_config(o->model) : o->config.empty() ? preset(o->preset)
                                                                                  : load_config(o->config);
      t.name = !o->model.empty() ? o->model : !o->config.empty() ? o->config : o->preset;
      t.batch = o->batch;
      t.seq_len = o->seq_len;
      t.steps = o->steps;
      t.reps = o->reps;
      t.profile = o->profile;
      t.json = o->json;
      t.peer = peer_opt->count() > 0;
      const std::string cpu_peer = std::string(HM_SOURCE_DIR) + "/bench/torch_peer.py";
      t.peer_script = o->peer == cpu_peer ? std::string(HM_SOURCE_DIR) + "/bench/cuda_peer.py" : o->peer;
      return bench_train_device(t, dev);
    }
    if (dev.device() != Device::CPU) {
      HM_CHECK(!o->routing_sweep, "bench --device ", device_name(dev.device()),
               ": --routing-sweep measures the CPU; use --device cpu");
      DeviceBenchOptions d;
      d.preset = o->preset;
      d.config = o->config;
      d.model = o->model;
      d.peer = peer_opt->count() > 0;
      const std::string cpu_peer = std::string(HM_SOURCE_DIR) + "/bench/torch_peer.py";
      d.peer_script = o->peer == cpu_peer ? std::string(HM_SOURCE_DIR) + "/bench/cuda_peer.py" : o->peer;
      d.json = o->json;
      d.quick = o->quick;
      d.decode_cases = o->decode_cases;
      d.prefill_cases = o->prefill_cases;
      d.reps = o->reps;
      return bench_device(d, dev);
    }
    HM_CHECK(o->prefill_cases.empty(), "bench --prefill-cases: --device cuda only (the CPU bench's prefill is "
             "its 'prefill' rows)");
    const KvType kv = dev.kv;
    Backend* be = dev.be.get();
    std::string dir = o->model;
    const ModelConfig given = !dir.empty() ? load_any_config(dir) : o->config.empty() ? preset(o->preset)
                                                                                      : load_config(o->config);
    check_memory(estimate_memory(given, o->train ? train_shape(o->batch, o->seq_len, threads)
                                                 : inference_shape(2, 8192, dev.kv_name())),
                 "hm bench");
    std::string tmpdir;
    std::unique_ptr<HybridModel> model;
    if (dir.empty()) {
      char tmpl[] = "/tmp/hm-bench-XXXXXX";
      HM_CHECK(mkdtemp(tmpl) != nullptr, "bench: cannot create a temporary directory");
      tmpdir = dir = tmpl;
      model = std::make_unique<HybridModel>(given, *be);
      init_params(model->params(), 1234);
      model->prepare();
      save_model(*model, dir);
      ByteTokenizer().save(dir);  // the child `hm generate` below needs a tokenizer
    } else {
      model = load_any_model(dir, *be);
    }
    const ModelConfig& c = model->config();
    const int V = c.vocab_size;
    Rng rng(42);
    std::vector<float> logits;
    nlohmann::json r;
    r["preset"] = !o->model.empty() ? dir : !o->config.empty() ? o->config : o->preset;
    r["threads"] = threads;
    r["kv_type"] = dev.kv_name();
    r["params"] = model->params().numel();
    r["weight_mb"] = double(model->weight_bytes()) / 1e6;
    r["cpu_model"] = cpu_model_name();
    r["cpu_isa"] = cpu::isa_name(cpu::kernel_isa());  // the CPU kernels' (HM_ISA forces one)
    r["cpu_linear_large"] = cpu::linear_large_in_blocks() ? "blocks" : "blas";  // HM_LINEAR forces one
    r["blas_core"] = cpu::blas_core();
    const int64_t l3 = l3_cache_bytes();
    r["l3_mb"] = double(l3) / (1 << 20);
    r["reps"] = o->reps;
    r["warmup"] = 1;
    HM_CHECK(o->reps >= 1, "bench: --reps must be >= 1, got ", o->reps);
    auto log = [&](const char* what) { if (!o->json) std::fprintf(stderr, "bench: %s...\n", what); };

    if (!o->weights.empty()) {
      HM_CHECK(!o->train && !o->routing_sweep && o->decode_cases.empty(),
               "bench --weights: not with --train, --routing-sweep or --decode-cases");
      const std::vector<DType> formats = weight_formats_option(o->weights);
      const size_t probe = dram_probe_bytes(l3);
      log("read bandwidth");
      r["read_bw_gbs"] = measure_read_gbs(probe);
      r["read_bw_exceeds_l3"] = l3 > 0 && int64_t(probe) > l3;
      r["weights"] = bench_weight_formats(*model, formats, kv, o->reps, r["read_bw_gbs"].get<double>(), o->json);
      if (!tmpdir.empty()) fs::remove_all(tmpdir);
      if (o->json) {
        std::printf("%s\n", r.dump().c_str());
      } else {
        std::printf("model %s: %.3g M parameters, %d threads, KV cache %s; CPU %s, L3 %.0f MiB\n",
                    r["preset"].get<std::string>().c_str(), r["params"].get<double>() / 1e6, threads,
                    r["kv_type"].get<std::string>().c_str(), r["cpu_model"].get<std::string>().c_str(),
                    r["l3_mb"].get<double>());
        print_weight_formats(r["weights"]);
      }
      return 0;
    }

    if (!o->decode_cases.empty()) {
      HM_CHECK(!o->train && !o->routing_sweep, "bench --decode-cases: not with --train or --routing-sweep");
      r["decode"] = bench_decode_cases(*model, o->decode_cases, kv, o->reps);
      if (!tmpdir.empty()) fs::remove_all(tmpdir);
      if (o->json) {
        std::printf("%s\n", r.dump().c_str());
      } else {
        std::vector<Row> rows;
        for (const auto& d : r["decode"]) {
          const std::string bc = std::to_string(d["batch"].get<int>()) + " x " + std::to_string(d["context"].get<int>());
          rows.push_back({"decode " + bc, "tok/s", d["tok_s"].is_number() ? d["tok_s"].get<double>() : NAN});
          rows.back().rate = true;
          rows.push_back({"ttft " + bc, "ms", d["ttft_ms"].get<double>()});
        }
        print_table(r, rows);
      }
      return 0;
    }

    if (o->routing_sweep) {
      const int L = seq_len_opt->count() > 0 ? o->seq_len : 2048;
      log("GEMM rate");
      r["gemm_gflops"] = measure_gemm_gflops(*be);
      r["routing_sweep"] = routing_sweep(*model, *be, L, o->reps, kv, o->json);
      if (!tmpdir.empty()) fs::remove_all(tmpdir);
      if (o->json) {
        std::printf("%s\n", r.dump().c_str());
      } else {
        const auto& s = r["routing_sweep"];
        std::printf("routing sweep: %d tokens, %d threads, prefill (median of %d)\n", L, threads, o->reps);
        std::printf("  both      %9.1f ms  %8.2f GFLOP\n", s["both"]["time_ms"].get<double>(),
                    s["both"]["flops"].get<double>() / 1e9);
        for (const auto& f : s["fractions"])
          std::printf("  f = %.2f  %9.1f ms  %8.2f GFLOP  flop saving %5.1f%%  time saving %5.1f%%  realized %.2f\n",
                      f["f"].get<double>(), f["time_ms"].get<double>(), f["flops"].get<double>() / 1e9,
                      100 * f["flop_saving"].get<double>(), 100 * f["time_saving"].get<double>(),
                      f["saving_realized_f"].get<double>());
        std::printf("saving_realized (min over f < 1): %.2f (from process CPU time: %.2f)\n",
                    s["saving_realized"].get<double>(), s["saving_realized_cpu"].get<double>());
      }
      return 0;
    }

    if (!o->train) {  // decode's roofline; training is bound by GEMMs, not by reading weights
      const size_t probe = dram_probe_bytes(l3);
      log("read bandwidth");
      const double bw = measure_read_gbs(probe);
      r["read_bw_gbs"] = bw;
      r["read_bw_probe_mb"] = double(probe) / (1 << 20);
      // DRAM only if the probe could not sit in L3 (false where memory is too small for that).
      r["read_bw_exceeds_l3"] = l3 > 0 && int64_t(probe) > l3;
      r["decode_roofline_tok_s"] = bw * 1e9 / double(model->weight_bytes());
    }
    log("GEMM rate");
    const double gemm = measure_gemm_gflops(*be);
    r["gemm_gflops"] = gemm;
    const std::string gemm_row = std::string("GEMM 1024^3 (") + (cpu::linear_large_in_blocks() ? "linear in blocks" : "sgemm") + ")";
    if (o->train) {
      HM_CHECK(o->batch >= 1 && o->seq_len >= 2 && o->steps >= 1,
               "bench: --train needs --batch >= 1, --seq-len >= 2 and --steps >= 1");
      const int B = o->batch, L = o->seq_len;
      r["batch"] = B;
      r["seq_len"] = L;
      r["steps"] = o->steps;
      r["reps"] = o->steps;  // the timed steps are the repetitions
      // The peer's batch: torch.randint(0, V) with a fixed seed. Ours: the same shape and
      // distribution from our Rng (the cost does not depend on which tokens). Targets = next
      // token; the last position has none (-1), as in the peer.
      std::vector<int32_t> tokens = random_tokens(rng, B * L, V), targets(tokens.size());
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < L; ++t)
          targets[size_t(b * L + t)] = t + 1 < L ? tokens[size_t(b * L + t + 1)] : -1;
      Params& P = model->params();
      Params grads(c);
      // The trainer's defaults (lr aside), clipping included: a step here is a step of hm train.
      AdamWConfig oc;
      oc.lr = 1e-3f;
      AdamW opt(P, oc);
      std::vector<double> step_ms, grad_ms;
      log("training steps");
      for (int s = 0; s < o->steps + 1; ++s) {  // step 0 warms allocations and caches (the peer: --warmup 1)
        auto t0 = Clock::now();
        zero(grads);
        loss_and_grad(P, grads, tokens.data(), targets.data(), B, L);
        auto t1 = Clock::now();
        opt.step(P, grads, oc.lr);
        auto t2 = Clock::now();
        if (s > 0) {
          step_ms.push_back(ms(t0, t2));
          grad_ms.push_back(ms(t0, t1));
        }
      }
      // Median step time, as the peer reports; tokens per step = B x L (every position is run).
      const double tok = double(B) * L;
      const double train_tok_s = tok / (median(step_ms) / 1e3);
      r["train_step_ms"] = median(step_ms);
      r["train_grad_ms"] = median(grad_ms);
      r["train_tok_s"] = train_tok_s;
      const double fpt = train_flops_per_token(c, P, L);
      r["train_flops_per_token"] = fpt;
      r["train_flop_fraction"] = fpt * train_tok_s / (gemm * 1e9);
      if (!o->no_peer) {
        log("PyTorch peer (training)");
        const std::string cmd = "/usr/bin/python3 '" + o->peer + "' train-bench --model '" + dir +
                                "' --threads " + std::to_string(threads) + " --batch " + std::to_string(B) +
                                " --seq-len " + std::to_string(L) + " --steps " + std::to_string(o->steps) +
                                " --warmup 1 --json";  // our step 0 is the warm-up
        const auto pj = nlohmann::json::parse(run_capture(cmd));
        for (auto it = pj.begin(); it != pj.end(); ++it)
          if (it.key().rfind("peer_", 0) == 0 || it.key() == "torch_version") r[it.key()] = it.value();
        r["train_vs_peer"] = train_tok_s / pj.at("peer_train_tok_s").get<double>();
      }
      if (!tmpdir.empty()) fs::remove_all(tmpdir);
      if (o->json) {
        std::printf("%s\n", r.dump().c_str());
      } else {
        const std::string shape = std::to_string(B) + "x" + std::to_string(L);
        print_table(r, {{"train step " + shape + " (grad + AdamW)", "ms", num(r, "train_step_ms"), NAN,
                         num(r, "peer_train_step_ms")},
                        {"train " + shape, "tok/s", train_tok_s,
                         gemm * 1e9 / fpt, num(r, "peer_train_tok_s"), true},
                        {gemm_row, "GFLOP/s", gemm, NAN, NAN, true}});
      }
      return 0;
    }

    // Prefill of 2 x 32 tokens, the seed's own measurement. As generation runs it (last-token
    // logits) and as the seed measured it (a full forward with logits for every token).
    log("prefill 2x32");
    {
      HybridMemory mem(*be, c, 2, 64, kv);
      for (int logits_all = 0; logits_all < 2; ++logits_all) {
        std::vector<double> t;
        for (int rep = 0; rep < o->reps + 1; ++rep) {  // rep 0 warms caches and allocations
          mem.seq_rm(0);
          mem.seq_rm(1);
          Batch b;
          b.add(0, random_tokens(rng, 32, V));
          b.add(1, random_tokens(rng, 32, V));
          b.logits_all = logits_all;
          auto t0 = Clock::now();
          model->forward(b, mem, logits);
          if (rep > 0) t.push_back(ms(t0, Clock::now()));
        }
        const char* key = logits_all ? "forward_all_logits_ms" : "prefill_ms";
        r[key] = median(t);
        // Floor: the matrix products at the measured GEMM rate.
        const double floor_ms = forward_gemm_flops(c, model->params(), 64, logits_all ? 64 : 2) / (gemm * 1e9) * 1e3;
        r[std::string(key) + "_floor"] = floor_ms;
        r[std::string(key) + "_floor_fraction"] = floor_ms / median(t);
      }
    }

    // Decode at batch 1: 50 new tokens after a 32-token prompt, greedy; the rate from the median
    // time of the 50 steps (prompt untimed), as the peer computes it.
    log("decode 32+50");
    {
      HybridMemory mem(*be, c, 1, 32 + 50 + 1, kv);
      std::vector<double> secs;
      for (int rep = 0; rep < o->reps + 1; ++rep) {  // rep 0 warms up
        mem.seq_rm(0);
        prefill(*model, mem, random_tokens(rng, 32, V), 512, logits);
        int32_t tok = argmax(logits.data(), V);
        auto t0 = Clock::now();
        for (int i = 0; i < 50; ++i) {
          Batch b;
          b.add(0, {tok});
          model->forward(b, mem, logits);
          tok = argmax(logits.data(), V);
        }
        if (rep > 0) secs.push_back(ms(t0, Clock::now()) / 1e3);
      }
      r["decode_tok_s"] = 50.0 / median(secs);
      r["decode_roofline_fraction"] = r["decode_tok_s"].get<double>() / r["decode_roofline_tok_s"].get<double>();
    }

    // Decode cost against context, and prefill cost per token at long prompts.
    std::vector<int> ctxs = {128, 1024, 4096};
    std::vector<int> plens = {512, 4096};
    if (o->quick) { ctxs = {128, 1024}; plens = {512}; }
    nlohmann::json dms = nlohmann::json::object(), pms = nlohmann::json::object();
    // ms per decoded token at context ctx, with cache type t: the prompt is prefilled once into
    // slot 0; each repetition copies it to slot 1 (untimed) and decodes 32 tokens there.
    auto decode_at = [&](int ctx, KvType t) {
      HybridMemory mem(*be, c, 2, ctx + 40, t);
      prefill(*model, mem, random_tokens(rng, ctx, V), 512, logits);
      const int32_t first = argmax(logits.data(), V);
      std::vector<double> per_token;
      for (int rep = 0; rep < o->reps + 1; ++rep) {  // rep 0 warms up
        mem.seq_cp(0, 1);
        int32_t tok = first;
        auto t0 = Clock::now();
        for (int i = 0; i < 32; ++i) {
          Batch b;
          b.add(1, {tok});
          model->forward(b, mem, logits);
          tok = argmax(logits.data(), V);
        }
        if (rep > 0) per_token.push_back(ms(t0, Clock::now()) / 32);
      }
      return median(per_token);
    };
    for (int ctx : ctxs) {
      log(("decode at context " + std::to_string(ctx)).c_str());
      dms[std::to_string(ctx)] = decode_at(ctx, kv);
    }
    if (!o->quick && kv != KvType::F32) {
      // The same growth with a float32 cache, for comparison in the same run.
      log("decode at contexts 128 and 4096 with a float32 cache");
      r["decode_growth_128_to_4096_f32kv"] = decode_at(4096, KvType::F32) / decode_at(128, KvType::F32) - 1.0;
    }
    for (int len : plens) {
      log(("prefill of " + std::to_string(len)).c_str());
      HybridMemory mem(*be, c, 1, len, kv);
      std::vector<double> t;
      for (int rep = 0; rep < o->reps + 1; ++rep) {  // rep 0 warms up
        mem.seq_rm(0);
        auto toks = random_tokens(rng, len, V);
        auto t0 = Clock::now();
        prefill(*model, mem, toks, 512, logits);
        if (rep > 0) t.push_back(ms(t0, Clock::now()) / len);
      }
      pms[std::to_string(len)] = median(t);
    }
    r["decode_ms_per_token"] = dms;
    r["prefill_ms_per_token"] = pms;
    if (dms.contains("128") && dms.contains("4096"))
      r["decode_growth_128_to_4096"] = dms["4096"].get<double>() / dms["128"].get<double>() - 1.0;

    // Peak memory of `hm generate` on this model, measured on the child process.
    log("peak memory of hm generate");
    {
      auto [rc, mb] = run_child({"/proc/self/exe", "generate", "--model", dir, "--prompt",
                                 "The quick brown fox jumps over the lazy dog.", "-n", "50",
                                 "--threads", std::to_string(threads), "--kv-type", dev.kv_name(),
                                 "--device", "cpu"}, true);
      HM_CHECK(rc == 0, "bench: hm generate failed with status ", rc);
      r["peak_rss_mb"] = mb;
    }

    if (!o->no_peer) {
      log("PyTorch peer");
      // The same repetitions, warm-up and statistic (median) as ours above.
      const std::string cmd = "/usr/bin/python3 '" + o->peer + "' bench --model '" + dir +
                              "' --threads " + std::to_string(threads) + " --reps " + std::to_string(o->reps) +
                              " --warmup 1 --json";
      const auto pj = nlohmann::json::parse(run_capture(cmd));
      for (auto it = pj.begin(); it != pj.end(); ++it)
        if (it.key().rfind("peer_", 0) == 0 || it.key() == "torch_version") r[it.key()] = it.value();
      HM_CHECK(pj.value("reps", 0) == o->reps && pj.value("warmup", -1) == 1,
               "bench: the peer ran ", pj.value("reps", 0), " repetitions after ", pj.value("warmup", -1),
               " warm-ups, not ", o->reps, " after 1 (an older ", o->peer, "?)");
      if (pj.contains("peer_decode_tok_s"))
        r["decode_vs_peer"] = r["decode_tok_s"].get<double>() / pj["peer_decode_tok_s"].get<double>();
      if (pj.contains("peer_prefill_ms"))
        r["prefill_vs_peer"] = pj["peer_prefill_ms"].get<double>() / r["forward_all_logits_ms"].get<double>();
    }
    if (!tmpdir.empty()) fs::remove_all(tmpdir);

    if (o->json) {
      std::printf("%s\n", r.dump().c_str());
      return 0;
    }
    std::vector<Row> rows = {
        {"prefill 2x32, last-token logits", "ms", num(r, "prefill_ms"), num(r, "prefill_ms_floor"),
         num(r, "peer_prefill_last_ms")},
        {"prefill 2x32, all logits", "ms", num(r, "forward_all_logits_ms"), num(r, "forward_all_logits_ms_floor"),
         num(r, "peer_prefill_ms")},
        {"decode 50 after 32, batch 1", "tok/s", num(r, "decode_tok_s"), num(r, "decode_roofline_tok_s"),
         num(r, "peer_decode_tok_s"), true}};
    for (int ctx : ctxs) rows.push_back({"decode at context " + std::to_string(ctx), "ms/token", dms[std::to_string(ctx)].get<double>()});
    if (r.contains("decode_growth_128_to_4096"))
      rows.push_back({"decode rise, context 128 -> 4096", "%", 100 * num(r, "decode_growth_128_to_4096")});
    if (r.contains("decode_growth_128_to_4096_f32kv"))
      rows.push_back({"same, f32 KV cache", "%", 100 * num(r, "decode_growth_128_to_4096_f32kv")});
    for (int len : plens) rows.push_back({"prefill of " + std::to_string(len) + " (chunks of 512)", "ms/token", pms[std::to_string(len)].get<double>()});
    rows.push_back({"peak RSS of hm generate (50 tokens)", "MB", num(r, "peak_rss_mb")});
    rows.push_back({"read bandwidth, " + cell(num(r, "read_bw_probe_mb")) + " MiB" +
                        (r["read_bw_exceeds_l3"].get<bool>() ? " (DRAM)" : " (may fit L3)"),
                    "GB/s", num(r, "read_bw_gbs"), NAN, NAN, true});
    rows.push_back({gemm_row, "GFLOP/s", gemm, NAN, NAN, true});
    print_table(r, rows);
    return 0;
  };
}

}  // namespace hm::cli
