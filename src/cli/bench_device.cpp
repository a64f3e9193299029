// hm bench --device cuda (issue 13, item 6): whole-model figures on the GPU and mamba_ssm's on the
// same checkpoint (bench/cuda_peer.py, docs/PEER_GPU.md) in one run, with the floors measured in
// the same run. Written on the Backend interface; only the device name and its memory figures
// need the CUDA runtime.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "cli/bench_common.h"
#include "cli/commands.h"
#include "cli/device.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/model.h"
#include "model/params.h"
#include "runtime/generate.h"

#ifdef HM_HAVE_CUDA
#include <cuda_runtime.h>

#include "backend/cuda/cuda_backend.h"
#endif

namespace hm::cli {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

constexpr int kNewTokens = 128;      // decode = (T(kNewTokens + 1) - T(1)) / kNewTokens, as the peer
constexpr int kPrefillLen = 2048;
constexpr int kDecodePrefillChunk = 2048;  // tokens per sequence per prefill forward in the decode runs
constexpr double kWarmSeconds = 0.5;   // least warm-up per measurement (the peer's --warm-s)
constexpr int kCheckTokens = 64;       // the logits check's sequence

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

std::string gpu_name() {
#ifdef HM_HAVE_CUDA
  int dev = 0;
  cudaDeviceProp p{};
  if (cudaGetDevice(&dev) == cudaSuccess && cudaGetDeviceProperties(&p, dev) == cudaSuccess) return p.name;
  cudaGetLastError();
#endif
  return "unknown";
}

// Device memory in use by every process (cudaMemGetInfo: total - free); 0 where unknown.
int64_t device_used_bytes() {
#ifdef HM_HAVE_CUDA
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) return int64_t(total_b - free_b);
  cudaGetLastError();
#endif
  return 0;
}

// The most bytes held through the backend's alloc since reset_alloc_peak (the CUDA backend
// counts them; -1 elsewhere): the same measure as the peer's torch.cuda.max_memory_allocated.
void reset_alloc_peak(Backend& be) {
#ifdef HM_HAVE_CUDA
  if (auto* cb = dynamic_cast<CudaBackend*>(&be)) cb->reset_peak();
#endif
  (void)be;
}
int64_t alloc_peak(Backend& be) {
#ifdef HM_HAVE_CUDA
  if (auto* cb = dynamic_cast<CudaBackend*>(&be)) return int64_t(cb->peak_allocated_bytes());
#endif
  (void)be;
  return -1;
}

std::vector<int32_t> random_ids(Rng& rng, size_t n, int vocab) {
  std::vector<int32_t> t(n);
  for (auto& x : t) x = int32_t(rng.next_u64() % uint64_t(vocab));
  return t;
}

// Milliseconds of fn (synchronized on both sides; prep runs untimed before each call), after at
// least one call and kWarmSeconds of calls; median of reps.
template <class P, class F>
double timed_median(Backend& be, int reps, P&& prep, F&& fn) {
  auto once = [&] {
    prep();
    be.synchronize();
    const auto t0 = Clock::now();
    fn();
    be.synchronize();
    return ms_between(t0, Clock::now());
  };
  const auto w0 = Clock::now();
  do once(); while (ms_between(w0, Clock::now()) < kWarmSeconds * 1e3);
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) t.push_back(once());
  return median(t);
}

// The backend's bf16 linear at 8192^3 (TFLOP/s) and a 1 GiB device-to-device copy (GB/s, bytes
// read + written), as cuda_peer.py's floors.
json measure_floors(Backend& be, int reps) {
  json f;
  {
    const int n = 8192;
    const size_t elems = size_t(n) * n;
    std::vector<float> host(elems);
    Rng rng(11);
    for (auto& x : host) x = rng.uniform(-1.f, 1.f);  // random: zeros multiply faster
    std::vector<uint16_t> h16(elems);
    convert_from_f32(h16.data(), DType::BF16, host.data(), elems);
    Buffer x(be, elems * 2), w(be, elems * 2), y(be, elems * 2);
    be.to_device(x.data(), h16.data(), elems * 2);
    be.to_device(w.data(), h16.data(), elems * 2);
    const Tensor tx(x.data(), DType::BF16, n, n), tw(w.data(), DType::BF16, n, n), ty(y.data(), DType::BF16, n, n);
    const double ms = timed_median(be, std::max(reps, 10), [] {}, [&] { be.linear(ty, tx, tw, false); });
    f["gemm_bf16_tflops"] = 2.0 * double(n) * n * n / (ms * 1e-3) / 1e12;
  }
  {
    const size_t bytes = size_t(1) << 30;
    Buffer a(be, bytes), b(be, bytes);
    be.memzero(a.data(), bytes);
    const double ms = timed_median(be, std::max(reps, 10), [] {}, [&] { be.copy(b.data(), a.data(), bytes); });
    f["copy_gb_s"] = 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
  }
  return f;
}

// Bytes one decode step reads for `batch` sequences at `ctx` cached positions: every weight once
// (an untied embedding table only gathers rows, so it is left out), each sequence's recurrent
// state read and written, and its K and V rows.
double decode_step_bytes(const HybridModel& m, int batch, double ctx, DType kv) {
  const ModelConfig& c = m.config();
  double w = double(m.weight_bytes());
  if (!c.tie_embeddings) w -= double(c.vocab_size) * c.d_model * double(dtype_size(m.dtype()));
  double per_seq = 0;
  for (int i = 0; i < c.n_layers; ++i) {
    if (c.has_mamba_path(i)) per_seq += 2.0 * 4.0 * double(c.d_inner()) * (c.d_conv - 1 + c.d_state);
    if (c.has_attention_path(i)) per_seq += ctx * 2.0 * c.n_kv_heads * c.head_dim() * double(dtype_size(kv));
  }
  return w + batch * per_seq;
}

struct DecodeCase {
  int batch, context;
};

// "64x16,16x8192" -> {{64, 16}, {16, 8192}}; anything else is an error naming the item.
std::vector<DecodeCase> parse_decode_cases(const std::string& spec, const char* option = "--decode-cases") {
  std::vector<DecodeCase> out;
  size_t pos = 0;
  while (pos <= spec.size()) {
    const size_t end = std::min(spec.find(',', pos), spec.size());
    const std::string item = spec.substr(pos, end - pos);
    const size_t x = item.find('x');
    int b = 0, c = 0;
    size_t nb = 0, nc = 0;
    try {
      if (x != std::string::npos) {
        b = std::stoi(item.substr(0, x), &nb);
        c = std::stoi(item.substr(x + 1), &nc);
      }
    } catch (const std::exception&) {
      nb = nc = 0;
    }
    HM_CHECK(x != std::string::npos && nb == x && nc == item.size() - x - 1 && b >= 1 && b <= 4096 && c >= 1 &&
                 c <= (1 << 20),
             "bench ", option, ": '", item, "' is not BATCHxN with batch in [1, 4096] and N in [1, 2^20]");
    out.push_back({b, c});
    pos = end + 1;
  }
  return out;
}

// T(n) = wall time of Generator (prefill + first token) and n - 1 decode steps, greedy, tokens
// sampled on the device; decode = (T(129) - T(1)) / 128, TTFT = T(1), as cuda_peer.py times
// mamba_ssm's generate.
json decode_case(HybridModel& m, const DecodeCase& dc, KvType kv, int reps, Rng& rng, int64_t used0) {
  Backend& be = m.backend();
  const ModelConfig& c = m.config();
  reset_alloc_peak(be);
  HybridMemory mem(be, c, dc.batch, dc.context + kNewTokens + 1, kv);
  std::vector<std::vector<int32_t>> prompts;
  for (int b = 0; b < dc.batch; ++b) prompts.push_back(random_ids(rng, size_t(dc.context), c.vocab_size));
  GenerateOptions opt;
  opt.sampling.temperature = 0;  // greedy (top_k=1 in the peer)
  opt.sampling.repeat_penalty = 1;
  opt.prefill_chunk = kDecodePrefillChunk;
  bool on_device = false;
  auto run = [&](int n) {
    opt.max_new_tokens = n;
    be.synchronize();
    const auto t0 = Clock::now();
    Generator g(m, mem, prompts, opt);
    while (!g.next().empty()) {}
    be.synchronize();
    on_device = g.samples_on_device();
    return ms_between(t0, Clock::now());
  };
  run(kNewTokens + 1);
  const auto w0 = Clock::now();
  do run(1); while (ms_between(w0, Clock::now()) < kWarmSeconds * 1e3);
  std::vector<double> long_ms, short_ms;
  for (int r = 0; r < reps; ++r) {
    long_ms.push_back(run(kNewTokens + 1));
    short_ms.push_back(run(1));
  }
  const double step = (median(long_ms) - median(short_ms)) / kNewTokens;
  json j = {{"batch", dc.batch}, {"context", dc.context}, {"ttft_ms", median(short_ms)},
            {"ms_per_step", step}, {"new_tokens", kNewTokens}, {"sampled_on_device", on_device},
            {"mem_bytes", device_used_bytes() - used0}, {"alloc_peak_bytes", alloc_peak(be)}};
  j["tok_s"] = step > 0 ? json(dc.batch / (step * 1e-3)) : json(nullptr);
  return j;
}

// One forward of `batch` fresh sequences of `len` tokens, logits of each last token left on the
// device (the peer: model(ids, num_last_tokens=1)). enqueue_ms: the host's time inside the forward
// call alone (launches and host work; the GPU runs behind it): near ms, the forward is host-bound.
json prefill_case(HybridModel& m, int batch, int len, KvType kv, int reps, Rng& rng, int64_t used0) {
  Backend& be = m.backend();
  const ModelConfig& c = m.config();
  reset_alloc_peak(be);
  HybridMemory mem(be, c, batch, len, kv);
  Batch b;
  for (int s = 0; s < batch; ++s) b.add(s, random_ids(rng, size_t(len), c.vocab_size));
  std::vector<double> enqueue;
  // The slots are cleared outside the timed part.
  const double ms = timed_median(
      be, reps, [&] { for (int s = 0; s < batch; ++s) mem.seq_rm(s); },
      [&] {
        const auto t0 = Clock::now();
        m.forward_device(b, mem);
        enqueue.push_back(ms_between(t0, Clock::now()));
      });
  enqueue.erase(enqueue.begin(), enqueue.end() - reps);  // the timed calls, not the warm-up's
  return {{"batch", batch}, {"seq_len", len}, {"ms", ms}, {"tok_s", batch * len / (ms * 1e-3)},
          {"enqueue_ms", median(enqueue)}, {"logits", "last"}, {"mem_bytes", device_used_bytes() - used0},
          {"alloc_peak_bytes", alloc_peak(be)}};
}

void write_f32(const std::string& path, const std::vector<float>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(float)));
  HM_CHECK(f.good(), "bench: cannot write ", path);
}

// max |a - b| / max |a| and the share of rows whose arg-max agree, over rows of V.
json compare_logits(const std::vector<float>& ref, const std::vector<float>& got, int V) {
  double diff = 0, top = 0;
  int rows = int(ref.size() / size_t(V)), agree = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff = std::max(diff, double(std::fabs(ref[i] - got[i])));
    top = std::max(top, double(std::fabs(ref[i])));
  }
  for (int r = 0; r < rows; ++r) {
    const float* a = ref.data() + size_t(r) * V;
    const float* b = got.data() + size_t(r) * V;
    agree += std::max_element(a, a + V) - a == std::max_element(b, b + V) - b;
  }
  return {{"max_abs", diff}, {"max_rel", diff / std::max(top, 1e-30)}, {"argmax_agree", double(agree) / rows}};
}

// "  peer prefill vs ours   max abs X   rel Y   argmax agree Z" lines of cuda_peer.py logits.
json parse_peer_compare(const std::string& out) {
  json j = json::object();
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    const size_t p = line.find("peer "), a = line.find("max abs"), r = line.find(" rel "), g = line.find("argmax agree");
    if (p == std::string::npos || a == std::string::npos || r == std::string::npos || g == std::string::npos) continue;
    std::string name = line.substr(p, a - p);
    while (!name.empty() && name.back() == ' ') name.pop_back();
    for (auto& ch : name) ch = ch == ' ' ? '_' : ch;
    try {
      j[name] = {{"max_abs", std::stod(line.substr(a + 7))}, {"max_rel", std::stod(line.substr(r + 5))},
                 {"argmax_agree", std::stod(line.substr(g + 12))}};
    } catch (const std::exception&) {
      j[name] = line;
    }
  }
  return j;
}

std::string tail(const std::string& s, size_t n = 1500) { return s.size() > n ? s.substr(s.size() - n) : s; }

// The last non-empty line (a Python traceback's error).
std::string last_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  const size_t p = s.rfind('\n');
  return p == std::string::npos ? s : s.substr(p + 1);
}

std::string quoted(const std::string& s) { return shell_quote(s); }

}  // namespace

json measure_device_floors(Backend& be, int reps) { return measure_floors(be, reps); }

json bench_decode_cases(HybridModel& m, const std::string& spec, KvType kv, int reps) {
  Rng rng(42);
  json out = json::array();
  for (const DecodeCase& dc : parse_decode_cases(spec)) {
    std::fprintf(stderr, "bench: decode batch %d after %d...\n", dc.batch, dc.context);
    json j = decode_case(m, dc, kv, reps, rng, 0);
    j.erase("mem_bytes");  // device figures; a host backend has neither
    j.erase("alloc_peak_bytes");
    j.erase("sampled_on_device");
    out.push_back(j);
  }
  return out;
}

int bench_device(const DeviceBenchOptions& o, DeviceSetup& dev) {
  namespace fs = std::filesystem;
  Backend& be = *dev.be;
  HM_CHECK(o.reps >= 1, "bench: --reps must be >= 1, got ", o.reps);
  auto log = [&](const std::string& what) { std::fprintf(stderr, "bench: %s...\n", what.c_str()); };
  const int64_t used0 = device_used_bytes();

  // The model: a checkpoint, or a preset / config file with random weights (seed 1234, as the CPU bench).
  std::unique_ptr<HybridModel> model;
  std::string name;
  log("model");
  if (!o.model.empty()) {
    model = load_model_on(o.model, be, dev.dtype);
    name = o.model;
  } else {
    const ModelConfig c = o.config.empty() ? preset(o.preset) : load_config(o.config);
    model = std::make_unique<HybridModel>(c, be, dev.dtype);
    init_params(model->params(), 1234);
    model->prepare();
    name = o.config.empty() ? o.preset : fs::path(o.config).stem().string();
  }
  HybridModel& m = *model;
  const ModelConfig& c = m.config();
  const int V = c.vocab_size;

  json r;
  r["tool"] = "hm bench --device";
  r["device"] = device_name(dev.device());
  r["gpu"] = gpu_name();
  r["model"] = name;
  r["config"] = config_to_json(c);
  r["params"] = m.params().numel();
  r["dtype"] = compute_dtype_name(m.dtype());
  r["kv_type"] = dev.kv_name();
  r["weight_bytes"] = m.weight_bytes();
  r["reps"] = o.reps;
  r["warm_s"] = kWarmSeconds;
  r["method"] =
      "prefill: synchronize, steady clock around one forward of B fresh sequences (last-token logits left on the "
      "device), median of reps after >= 1 call and warm_s of calls; decode: T(n) = wall time of Generator "
      "(prefill in chunks of 2048 tokens per sequence, first token) plus n - 1 greedy steps sampled on the device, "
      "ms_per_step = (median T(129) - median T(1)) / 128, ttft_ms = median T(1), T(129) once and warm_s of T(1) "
      "first; floors: backend linear bf16 8192^3 and a 1 GiB device copy (bytes read + written), medians of "
      "max(reps, 10) after warm_s";
  r["memory_method"] =
      "mem_bytes: device memory in use (cudaMemGetInfo total - free) after the measurement's runs, while its "
      "cache and the model's workspaces are still held, minus the use before the model was built (the CUDA "
      "context excluded); our buffers only grow within a run, so this is their high-water mark, including "
      "workspaces grown by earlier measurements of the same run; another process freeing memory meanwhile can "
      "make it wrong, even negative. alloc_peak_bytes (the table's figure and the ratio's): the most bytes held "
      "through the backend's alloc during the measurement (weights, caches, activations, op workspaces; not "
      "cuBLAS's own 32 MiB workspace), as the peer's torch.cuda.max_memory_allocated counts its tensors";

  log("floors (bf16 GEMM 8192^3, device copy)");
  double gemm = NAN, copy = NAN;
  try {
    r["floors"] = measure_floors(be, o.reps);
    gemm = r["floors"]["gemm_bf16_tflops"].get<double>() * 1e12;
    copy = r["floors"]["copy_gb_s"].get<double>() * 1e9;
  } catch (const std::exception& e) {
    r["floors"] = {{"error", e.what()}};
  }
  std::fprintf(stderr, "bench: floors %s\n", r["floors"].dump().c_str());

  Rng rng(42);
  std::vector<DecodeCase> cases = {{1, 16}, {16, 16}, {64, 16}, {1, 128}, {16, 128}, {1, 8192}, {16, 8192}};
  if (o.quick) cases = {{1, 16}, {4, 16}, {1, 128}};
  // Prefill cases as (batch, tokens per sequence).
  std::vector<DecodeCase> prefills = {{1, kPrefillLen}, {o.quick ? 2 : 8, kPrefillLen}};
  if (!o.decode_cases.empty() || !o.prefill_cases.empty()) {
    cases = o.decode_cases.empty() ? std::vector<DecodeCase>{} : parse_decode_cases(o.decode_cases);
    prefills = o.prefill_cases.empty() ? std::vector<DecodeCase>{} : parse_decode_cases(o.prefill_cases, "--prefill-cases");
  }
  HM_CHECK(!o.peer || o.prefill_cases.empty(), "bench --prefill-cases: not with --peer (the peer times ",
           kPrefillLen, "-token prefills only)");
  r["decode"] = json::array();
  for (const DecodeCase& dc : cases) {
    log("decode batch " + std::to_string(dc.batch) + " after " + std::to_string(dc.context));
    json j;
    try {
      j = decode_case(m, dc, dev.kv, o.reps, rng, used0);
      const double floor_tok_s =
          dc.batch / (decode_step_bytes(m, dc.batch, dc.context + kNewTokens / 2.0, dev.kv) / copy);
      j["floor_tok_s"] = floor_tok_s;
      if (j["tok_s"].is_number()) j["floor_fraction"] = j["tok_s"].get<double>() / floor_tok_s;
    } catch (const std::exception& e) {  // e.g. out of device memory at 16 x 8192: recorded, the run goes on
      j = {{"batch", dc.batch}, {"context", dc.context}, {"error", e.what()}};
    }
    std::fprintf(stderr, "bench: decode %s\n", j.dump().c_str());  // kept if the run is cut short
    r["decode"].push_back(j);
  }
  r["prefill"] = json::array();
  for (const auto [b, len] : prefills) {
    log("prefill " + std::to_string(b) + " x " + std::to_string(len));
    json j;
    try {
      j = prefill_case(m, b, len, dev.kv, o.reps, rng, used0);
      const double floor_ms = forward_gemm_flops(c, m.params(), double(b) * len, b) / gemm * 1e3;
      j["floor_ms"] = floor_ms;
      j["floor_fraction"] = floor_ms / j["ms"].get<double>();
    } catch (const std::exception& e) {
      j = {{"batch", b}, {"seq_len", len}, {"error", e.what()}};
    }
    std::fprintf(stderr, "bench: prefill %s\n", j.dump().c_str());
    r["prefill"].push_back(j);
  }

  // Logits of one fixed sequence: one prefill forward, then token by token from a fresh slot.
  char tmpl[] = "/tmp/hm-bench-device-XXXXXX";
  HM_CHECK(mkdtemp(tmpl) != nullptr, "bench: cannot create a temporary directory");
  const std::string tmp = tmpl;
  const std::vector<int32_t> check_ids = random_ids(rng, kCheckTokens, V);
  const std::string ours_prefill = tmp + "/ours.prefill.bin", ours_decode = tmp + "/ours.decode.bin";
  log("logits of a fixed sequence (prefill, token by token)");
  try {
    HybridMemory mem(be, c, 1, kCheckTokens, dev.kv);
    std::vector<float> pre, dec, step;
    Batch b;
    b.add(0, check_ids);
    b.logits_all = true;
    m.forward(b, mem, pre);
    mem.seq_rm(0);
    for (int32_t t : check_ids) {
      Batch s;
      s.add(0, {t});
      m.forward(s, mem, step);
      dec.insert(dec.end(), step.begin(), step.end());
    }
    write_f32(ours_prefill, pre);
    write_f32(ours_decode, dec);
    r["logits_check"] = {{"tokens", kCheckTokens}, {"ours_decode_vs_ours_prefill", compare_logits(pre, dec, V)}};
  } catch (const std::exception& e) {
    r["logits_check"] = {{"error", e.what()}};
  }

  // The peer on the same weights (stored BF16: exactly the values our bf16 copy computes with).
  if (o.peer) {
    json p;
    const auto [py_rc, py_out] = run_capture_status("python3 -c 'import torch, mamba_ssm' 2>&1");
    if (py_rc != 0) {
      p["skipped"] = "python3 cannot import torch and mamba_ssm (set PYTHONPATH as docs/PEER_GPU.md says): " +
                     last_line(py_out);
    } else if (!fs::exists(o.peer_script)) {
      p["skipped"] = "no peer script at " + o.peer_script + " (give --peer PATH/bench/cuda_peer.py)";
    } else {
      const std::string ckpt = tmp + "/ckpt";
      log("writing the checkpoint for the peer");
      save_model(m, ckpt, "BF16");
      std::string dec_list, pre_list;
      for (const DecodeCase& dc : cases)
        dec_list += (dec_list.empty() ? "" : ",") + std::to_string(dc.batch) + "x" + std::to_string(dc.context);
      for (const auto& pc : prefills) pre_list += (pre_list.empty() ? "" : ",") + std::to_string(pc.batch);
      log("mamba_ssm peer (bench)");
      const std::string peer_json = tmp + "/peer.json";
      const auto [rc, out] = run_capture_status(
          "python3 " + quoted(o.peer_script) + " bench --ckpt " + quoted(ckpt) + " --reps " +
          std::to_string(o.reps) + " --decode " + dec_list + " --prefill-batches " + quoted(std::as_const(pre_list)) + " --json " +
          quoted(peer_json) + " 2>&1");
      p["bench_status"] = rc;
      try {
        std::ifstream f(peer_json);
        HM_CHECK(f.good(), "the peer wrote no ", peer_json);
        const json pj = json::parse(f);
        p["floors"] = pj.at("floors");
        p["versions"] = pj.value("versions", json());
        p["attn_decode"] = pj.value("attn_decode", "");
        if (!pj.at("models").empty()) p["model"] = pj.at("models").at(0);
      } catch (const std::exception& e) {
        p["error"] = std::string("peer bench: ") + e.what() + "; its output: " + tail(out);
      }
      if (r["logits_check"].contains("tokens")) {
        log("mamba_ssm peer (logits, float32)");
        std::string ids;
        for (int32_t t : check_ids) ids += (ids.empty() ? "" : ",") + std::to_string(t);
        // --tol: every difference is reported, none fails the call; fp32: the exact reference
        // for the weights both sides hold.
        const auto [lrc, lout] = run_capture_status(
            "python3 " + quoted(o.peer_script) + " logits --ckpt " + quoted(ckpt) + " --tokens " + ids +
            " --dtype fp32 --out " + quoted(tmp + "/peer") + " --ours " + quoted(ours_prefill) + " --tol 1e30 2>&1");
        r["logits_check"]["peer_status"] = lrc;
        r["logits_check"]["peer_fp32_vs_ours_prefill"] = parse_peer_compare(lout);
        if (lrc != 0) r["logits_check"]["peer_output"] = tail(lout);
      }
    }
    r["peer"] = p;
    // Ratios: > 1 means ours is faster (or smaller, for memory).
    if (p.contains("model") && p["model"].contains("decode")) {
      json ratios = json::array();
      for (const auto& ours : r["decode"])
        for (const auto& theirs : p["model"]["decode"])
          if (ours.contains("tok_s") && ours["tok_s"].is_number() && theirs.value("batch", -1) == ours["batch"] &&
              theirs.value("context", -1) == ours["context"] && theirs.contains("tok_s") &&
              theirs["tok_s"].is_number()) {
            json x = {{"batch", ours["batch"]}, {"context", ours["context"]},
                      {"decode_tok_s", ours["tok_s"].get<double>() / theirs["tok_s"].get<double>()},
                      {"ttft", theirs["ttft_ms"].get<double>() / ours["ttft_ms"].get<double>()}};
            if (theirs.contains("peak_mem_bytes") && ours.value("alloc_peak_bytes", int64_t(-1)) > 0)
              x["mem_peer_over_ours"] =
                  theirs["peak_mem_bytes"].get<double>() / ours["alloc_peak_bytes"].get<double>();
            ratios.push_back(x);
          }
      for (const auto& ours : r["prefill"])
        for (const auto& theirs : p["model"].value("prefill", json::array()))
          if (ours.contains("ms") && theirs.value("batch", -1) == ours["batch"])
            ratios.push_back({{"batch", ours["batch"]}, {"seq_len", ours["seq_len"]},
                              {"prefill", theirs["ms"].get<double>() / ours["ms"].get<double>()}});
      r["vs_peer"] = ratios;
    }
  }
  std::error_code ec;
  fs::remove_all(tmp, ec);

  // The table (on stderr with --json, so one run gives both).
  auto peer_of = [&](const char* kind, const json& ours, const char* key) -> double {
    if (!r.contains("peer") || !r["peer"].contains("model")) return NAN;
    for (const auto& t : r["peer"]["model"].value(kind, json::array()))
      if (t.value("batch", -1) == ours["batch"] &&
          (std::string(kind) == "prefill" || t.value("context", -1) == ours["context"]) && t.contains(key) &&
          t[key].is_number())
        return t[key].get<double>();
    return NAN;
  };
  auto num = [](const json& j, const char* key) -> double { return j.contains(key) && j[key].is_number() ? j[key].get<double>() : NAN; };
  std::vector<Row> rows;
  for (const auto& j : r["prefill"]) {
    rows.push_back({"prefill " + std::to_string(j["batch"].get<int>()) + " x " + std::to_string(j["seq_len"].get<int>()),
                    "ms", num(j, "ms"), num(j, "floor_ms"), peer_of("prefill", j, "ms")});
    rows.push_back({"  host time inside the call", "ms", num(j, "enqueue_ms"), NAN, NAN});
  }
  for (const auto& j : r["decode"]) {
    const std::string shape = std::to_string(j["batch"].get<int>()) + " after " + std::to_string(j["context"].get<int>());
    rows.push_back({"decode batch " + shape, "tok/s", num(j, "tok_s"), num(j, "floor_tok_s"),
                    peer_of("decode", j, "tok_s"), true});
    rows.push_back({"  time to first token, " + shape, "ms", num(j, "ttft_ms"), NAN, peer_of("decode", j, "ttft_ms")});
    rows.push_back({"  memory allocated (peak), " + shape, "MiB", num(j, "alloc_peak_bytes") / 1048576.0, NAN,
                    peer_of("decode", j, "peak_mem_bytes") / 1048576.0});
  }
  rows.push_back({"bf16 GEMM 8192^3 (our linear)", "TFLOP/s", gemm / 1e12, NAN,
                  r.contains("peer") && r["peer"].contains("floors") ? num(r["peer"]["floors"], "gemm_bf16_tflops") : NAN,
                  true});
  rows.push_back({"device copy 1 GiB (read + written)", "GB/s", copy / 1e9, NAN,
                  r.contains("peer") && r["peer"].contains("floors") ? num(r["peer"]["floors"], "copy_gb_s") : NAN, true});
  FILE* out = o.json ? stderr : stdout;
  std::fflush(stdout);
  std::fprintf(out, "model %s: %.4g M parameters, %s weights %.4g MB, KV cache %s, on %s; medians of %d reps\n",
               name.c_str(), double(m.params().numel()) / 1e6, compute_dtype_name(m.dtype()),
               double(m.weight_bytes()) / 1e6, dev.kv_name().c_str(), r["gpu"].get<std::string>().c_str(), o.reps);
  if (r.contains("peer") && r["peer"].contains("skipped"))
    std::fprintf(out, "peer skipped: %s\n", r["peer"]["skipped"].get<std::string>().c_str());
  if (r.contains("peer") && r["peer"].contains("error"))
    std::fprintf(out, "peer failed: %s\n", r["peer"]["error"].get<std::string>().c_str());
  for (const auto& j : r["decode"])
    if (j.contains("error")) std::fprintf(out, "decode %d after %d failed: %s\n", j["batch"].get<int>(),
                                          j["context"].get<int>(), j["error"].get<std::string>().c_str());
  print_rows(rows, out);
  if (r["logits_check"].contains("ours_decode_vs_ours_prefill"))
    std::fprintf(out, "logits (%d tokens): ours token by token vs ours prefill: max rel %.3g, argmax agree %.3f\n",
                 kCheckTokens, r["logits_check"]["ours_decode_vs_ours_prefill"]["max_rel"].get<double>(),
                 r["logits_check"]["ours_decode_vs_ours_prefill"]["argmax_agree"].get<double>());
  if (r["logits_check"].contains("peer_fp32_vs_ours_prefill"))
    for (auto it = r["logits_check"]["peer_fp32_vs_ours_prefill"].begin();
         it != r["logits_check"]["peer_fp32_vs_ours_prefill"].end(); ++it)
      if (it.value().is_object())
        std::fprintf(out, "logits: %s: max rel %.3g, argmax agree %.3f\n", it.key().c_str(),
                     it.value()["max_rel"].get<double>(), it.value()["argmax_agree"].get<double>());
  if (o.json) std::printf("%s\n", r.dump().c_str());
  return 0;
}

}  // namespace hm::cli
