// hm bench: the numbers of docs/PERFORMANCE.md, all measured in one run so ratios hold on a
// noisy shared machine. The PyTorch peer runs the same checkpoint with the same threads.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>

#include "backend/backend.h"
#include "backend/counting_backend.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/threads.h"
#include "model/model.h"
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
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Sustained DRAM read bandwidth: a vectorized sum over 1 GiB, best of several. (256 MiB fits
// the 260 MiB L3 this machine's host shares, which made the figure swing from 37 to 70 GB/s.)
double measure_read_gbs() {
  const size_t n = (size_t(1) << 30) / sizeof(float);
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
      // 64 independent lanes (four AVX-512 registers): bound by memory, not by an add chain.
      float acc[64] = {};
#pragma omp for
      for (size_t i = 0; i < n; i += 64)
        for (int j = 0; j < 64; ++j) acc[j] += a[i + size_t(j)];
      for (float x : acc) total += x;
    }
    const double s = ms(t0, Clock::now()) / 1e3;
    sink = sink + float(total);
    best = std::max(best, double(n * sizeof(float)) / s / 1e9);
  }
  return best;
}

// The GEMM rate our linear layers get: backend linear (OpenBLAS sgemm) at 1024^3, best of several.
double measure_gemm_gflops(Backend& be) {
  const int n = 1024;
  std::vector<float> a(size_t(n) * n), b(size_t(n) * n), c(size_t(n) * n);
  Rng rng(7);
  for (auto& x : a) x = rng.uniform(-1.f, 1.f);
  for (auto& x : b) x = rng.uniform(-1.f, 1.f);
  double best = 0;
  for (int r = 0; r < 6; ++r) {
    auto t0 = Clock::now();
    be.linear(c.data(), n, a.data(), n, b.data(), n, n, n, false);
    best = std::max(best, 2.0 * n * n * n / (ms(t0, Clock::now()) / 1e3) / 1e9);
  }
  return best;
}

// Multiply-add FLOPs of the matrix products of a forward over T tokens in n_seqs sequences
// that produces logits for `rows` rows (the part a GEMM floor bounds; scan, conv, norms and
// attention scores are counted separately below and are small at these lengths).
double forward_gemm_flops(const ModelConfig& c, const Params& p, double T, double rows) {
  double layer_params = 0;
  for (const auto& s : p.specs())
    if (s.shape.size() == 2 && s.name.find("embeddings") == std::string::npos && s.name != "lm_head.weight")
      layer_params += double(s.numel());
  return 2.0 * T * layer_params + 2.0 * rows * double(c.vocab_size) * c.d_model;
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

std::vector<int32_t> random_tokens(Rng& rng, int n, int vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng.next_u64() % uint64_t(std::min(vocab, 259)));
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

std::string run_capture(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  HM_CHECK(p != nullptr, "bench: cannot run '", cmd, "'");
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int rc = pclose(p);
  HM_CHECK(rc == 0, "bench: '", cmd, "' failed (status ", rc, ")");
  return out;
}


// hm bench --routing-sweep (docs/TRUE_HYBRID.md, "Routing sweep"): does skipping a path in hard
// routing save the time its FLOPs promise? One sequence of L random tokens, one prefill forward
// (last-token logits), with the routes forced to send a fraction f of the tokens to attention,
// against routing_mode "both" (every token runs both paths). FLOPs are counted by the counting
// backend on an untimed run; times are the best of `reps` runs after a warm-up, the runs of all
// configurations interleaved so that the machine's drift hits each alike.
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
  std::vector<nlohmann::json> ms_by_op(static_cast<size_t>(n_cfg));  // of each configuration's best run
  for (int rep = 0; rep < reps; ++rep) {
    if (!quiet) std::fprintf(stderr, "bench: routing sweep, repetition %d of %d...\n", rep + 1, reps);
    for (int k = 0; k < n_cfg; ++k) {
      be.reset();
      const double tk = run(k);
      if (t[size_t(k)].empty() || tk < *std::min_element(t[size_t(k)].begin(), t[size_t(k)].end())) {
        // Time inside backend ops by kind; what remains is host glue (router, gathers, fusion).
        nlohmann::json j;
        double in_ops = 0;
        for (int op = 0; op < int(OpKind::kCount); ++op) {
          const OpCount& oc = be.count(OpKind(op));
          if (oc.calls == 0) continue;
          j[op_kind_name(OpKind(op))] = oc.seconds * 1e3;
          in_ops += oc.seconds * 1e3;
        }
        j["host_glue"] = tk - in_ops;
        ms_by_op[size_t(k)] = j;
      }
      t[size_t(k)].push_back(tk);
    }
  }
  auto best = [&](int k) { return *std::min_element(t[size_t(k)].begin(), t[size_t(k)].end()); };
  auto best_cpu = [&](int k) { return *std::min_element(cpu[size_t(k)].begin(), cpu[size_t(k)].end()); };
  const double tb = best(n_cfg - 1), fb = flops[size_t(n_cfg - 1)], cb = best_cpu(n_cfg - 1);
  nlohmann::json r, rows = nlohmann::json::array();
  double realized = 1e30, realized_cpu = 1e30;
  for (size_t k = 0; k < fracs.size(); ++k) {
    const double tf = best(int(k)), ff = flops[k], cf = best_cpu(int(k));
    const double flop_saving = (fb - ff) / fb, time_saving = (tb - tf) / tb;
    const double sr = time_saving / flop_saving, sr_cpu = (cb - cf) / cb / flop_saving;
    if (fracs[k] < 1.0) {
      realized = std::min(realized, sr);
      realized_cpu = std::min(realized_cpu, sr_cpu);
    }
    rows.push_back({{"f", fracs[k]}, {"time_ms", tf}, {"time_ms_median", median(t[k])}, {"cpu_ms", cf},
                    {"saving_realized_cpu_f", sr_cpu}, {"flops", ff},
                    {"gflop_s", ff / tf / 1e6}, {"flop_saving", flop_saving}, {"time_saving", time_saving},
                    {"saving_realized_f", sr}, {"flops_by_op", by_op[k]}, {"ms_by_op", ms_by_op[k]}});
  }
  r["seq_len"] = L;
  r["reps"] = reps;
  r["timing"] = "best of reps, after one untimed run";
  r["both"] = {{"time_ms", tb}, {"time_ms_median", median(t[size_t(n_cfg - 1)])}, {"cpu_ms", cb}, {"flops", fb},
               {"gflop_s", fb / tb / 1e6}, {"flops_by_op", by_op[size_t(n_cfg - 1)]},
               {"ms_by_op", ms_by_op[size_t(n_cfg - 1)]}};
  r["fractions"] = rows;
  r["saving_realized"] = realized;  // min over f = 0, 0.25, 0.5, 0.75
  r["saving_realized_cpu"] = realized_cpu;  // the same from process CPU time
  return r;
}

}  // namespace

Run add_bench(CLI::App& app) {
  struct Opts {
    std::string preset = "seed", model, peer = std::string(HM_SOURCE_DIR) + "/bench/torch_peer.py";
    int threads = 0, reps = 5;
    std::string kv = "f16";
    bool json = false, no_peer = false, quick = false;
    bool train = false, routing_sweep = false;
    int batch = 8, seq_len = 128, steps = 5;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--preset", o->preset, "Preset to measure (random weights)")->capture_default_str();
  app.add_option("--model", o->model, "Measure this checkpoint instead of a preset");
  app.add_option("--threads,-t", o->threads, "Threads for us and the peer (0 = all cores)")->capture_default_str();
  app.add_option("--reps", o->reps, "Repetitions per timing (median reported)")->capture_default_str();
  app.add_option("--peer", o->peer, "Path of the PyTorch peer script")->capture_default_str();
  app.add_option("--kv-type", o->kv, "KV cache element type: f16 or f32")->capture_default_str();
  app.add_flag("--json", o->json, "Print one JSON object");
  app.add_flag("--no-peer", o->no_peer, "Skip the PyTorch peer");
  app.add_flag("--quick", o->quick, "Contexts up to 1024 only (for smoke tests)");
  app.add_flag("--train", o->train, "Measure training steps (loss_and_grad + AdamW) instead of inference");
  app.add_option("--batch", o->batch, "--train: sequences per step")->capture_default_str();
  CLI::Option* seq_len_opt =
      app.add_option("--seq-len", o->seq_len, "--train: tokens per sequence (--routing-sweep: 2048 unless given)")
          ->capture_default_str();
  app.add_flag("--routing-sweep", o->routing_sweep,
               "True hybrid: prefill time and counted FLOPs at forced attention fractions 0..1 against routing_mode both");
  app.add_option("--steps", o->steps, "--train: timed steps (after one warm-up step)")->capture_default_str();
  return [o, seq_len_opt] {
    namespace fs = std::filesystem;
    if (o->threads > 0) set_num_threads(o->threads);
    const int threads = num_threads();
    const KvType kv = kv_type_from_name(o->kv);
    auto be = make_cpu_backend();
    std::string dir = o->model;
    std::string tmpdir;
    std::unique_ptr<HybridModel> model;
    if (dir.empty()) {
      char tmpl[] = "/tmp/hm-bench-XXXXXX";
      HM_CHECK(mkdtemp(tmpl) != nullptr, "bench: cannot create a temporary directory");
      tmpdir = dir = tmpl;
      model = std::make_unique<HybridModel>(preset(o->preset), *be);
      init_params(model->params(), 1234);
      model->prepare();
      save_model(*model, dir);
    } else {
      model = load_model(dir, *be);
    }
    const ModelConfig& c = model->config();
    const int V = c.vocab_size;
    Rng rng(42);
    std::vector<float> logits;
    nlohmann::json r;
    r["preset"] = o->model.empty() ? o->preset : dir;
    r["threads"] = threads;
    r["kv_type"] = o->kv;
    r["params"] = model->params().numel();
    r["weight_mb"] = double(model->weight_bytes()) / 1e6;
    auto log = [&](const char* what) { if (!o->json) std::fprintf(stderr, "bench: %s...\n", what); };

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
        std::printf("routing sweep: %d tokens, %d threads, prefill (best of %d)\n", L, threads, o->reps);
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
      log("read bandwidth");
      const double bw = measure_read_gbs();
      r["read_bw_gbs"] = bw;
      r["decode_roofline_tok_s"] = bw * 1e9 / double(model->weight_bytes());
    }
    log("GEMM rate");
    const double gemm = measure_gemm_gflops(*be);
    r["gemm_gflops"] = gemm;
    if (o->train) {
      HM_CHECK(o->batch >= 1 && o->seq_len >= 2 && o->steps >= 1,
               "bench: --train needs --batch >= 1, --seq-len >= 2 and --steps >= 1");
      const int B = o->batch, L = o->seq_len;
      r["batch"] = B;
      r["seq_len"] = L;
      r["steps"] = o->steps;
      // The peer's batch: torch.randint with a fixed seed. Ours: the same shape and distribution
      // from our Rng (the cost does not depend on which tokens). Targets = next token; the last
      // position has none (-1), as in the peer.
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
      for (int s = 0; s < o->steps + 1; ++s) {  // step 0 warms allocations and caches
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
                                " --warmup 1 --json";
        const auto pj = nlohmann::json::parse(run_capture(cmd));
        for (auto it = pj.begin(); it != pj.end(); ++it)
          if (it.key().rfind("peer_", 0) == 0 || it.key() == "torch_version") r[it.key()] = it.value();
        r["train_vs_peer"] = train_tok_s / pj.at("peer_train_tok_s").get<double>();
      }
      if (!tmpdir.empty()) fs::remove_all(tmpdir);
      std::printf("%s\n", o->json ? r.dump().c_str() : r.dump(2).c_str());
      return 0;
    }

    // Prefill of 2 x 32 tokens, the seed's own measurement. As generation runs it (last-token
    // logits) and as the seed measured it (a full forward with logits for every token).
    log("prefill 2x32");
    {
      HybridMemory mem(*be, c, 2, 64, kv);
      for (int logits_all = 0; logits_all < 2; ++logits_all) {
        std::vector<double> t;
        for (int rep = 0; rep < o->reps + 1; ++rep) {
          mem.seq_rm(0);
          mem.seq_rm(1);
          Batch b;
          b.add(0, random_tokens(rng, 32, V));
          b.add(1, random_tokens(rng, 32, V));
          b.logits_all = logits_all;
          auto t0 = Clock::now();
          model->forward(b, mem, logits);
          if (rep > 0) t.push_back(ms(t0, Clock::now()));  // first run warms caches and allocations
        }
        const char* key = logits_all ? "forward_all_logits_ms" : "prefill_ms";
        r[key] = median(t);
        // Floor: the matrix products at the measured GEMM rate.
        const double floor_ms = forward_gemm_flops(c, model->params(), 64, logits_all ? 64 : 2) / (gemm * 1e9) * 1e3;
        r[std::string(key) + "_floor"] = floor_ms;
        r[std::string(key) + "_floor_fraction"] = floor_ms / median(t);
      }
    }

    // Decode at batch 1: 50 new tokens after a 32-token prompt, greedy.
    log("decode 32+50");
    {
      HybridMemory mem(*be, c, 1, 32 + 50 + 1, kv);
      std::vector<double> rates;
      for (int rep = 0; rep < std::max(2, o->reps / 2 + 1); ++rep) {
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
        if (rep > 0) rates.push_back(50.0 / (ms(t0, Clock::now()) / 1e3));
      }
      r["decode_tok_s"] = median(rates);
      r["decode_roofline_fraction"] = median(rates) / r["decode_roofline_tok_s"].get<double>();
    }

    // Decode cost against context, and prefill cost per token at long prompts.
    std::vector<int> ctxs = {128, 1024, 4096};
    std::vector<int> plens = {512, 4096};
    if (o->quick) { ctxs = {128, 1024}; plens = {512}; }
    nlohmann::json dms = nlohmann::json::object(), pms = nlohmann::json::object();
    // Median ms per decoded token at context ctx, with cache type t.
    auto decode_at = [&](int ctx, KvType t) {
      HybridMemory mem(*be, c, 1, ctx + 40, t);
      prefill(*model, mem, random_tokens(rng, ctx, V), 512, logits);
      int32_t tok = argmax(logits.data(), V);
      std::vector<double> times;
      for (int i = 0; i < 32; ++i) {
        Batch b;
        b.add(0, {tok});
        auto t0 = Clock::now();
        model->forward(b, mem, logits);
        times.push_back(ms(t0, Clock::now()));
        tok = argmax(logits.data(), V);
      }
      return median(times);
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
      for (int rep = 0; rep < 2; ++rep) {
        mem.seq_rm(0);
        auto toks = random_tokens(rng, len, V);
        auto t0 = Clock::now();
        prefill(*model, mem, toks, 512, logits);
        t.push_back(ms(t0, Clock::now()) / len);
      }
      pms[std::to_string(len)] = *std::min_element(t.begin(), t.end());
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
                                 "--threads", std::to_string(threads), "--kv-type", o->kv}, true);
      HM_CHECK(rc == 0, "bench: hm generate failed with status ", rc);
      r["peak_rss_mb"] = mb;
    }

    if (!o->no_peer) {
      log("PyTorch peer");
      const std::string cmd = "/usr/bin/python3 '" + o->peer + "' bench --model '" + dir +
                              "' --threads " + std::to_string(threads) + " --json";
      const auto pj = nlohmann::json::parse(run_capture(cmd));
      for (auto it = pj.begin(); it != pj.end(); ++it)
        if (it.key().rfind("peer_", 0) == 0 || it.key() == "torch_version") r[it.key()] = it.value();
      if (pj.contains("peer_decode_tok_s"))
        r["decode_vs_peer"] = r["decode_tok_s"].get<double>() / pj["peer_decode_tok_s"].get<double>();
      if (pj.contains("peer_prefill_ms"))
        r["prefill_vs_peer"] = pj["peer_prefill_ms"].get<double>() / r["forward_all_logits_ms"].get<double>();
    }
    if (!tmpdir.empty()) fs::remove_all(tmpdir);

    if (o->json) {
      std::printf("%s\n", r.dump().c_str());
    } else {
      std::printf("%s\n", r.dump(2).c_str());
    }
    return 0;
  };
}

}  // namespace hm::cli
