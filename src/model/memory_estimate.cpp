#include "model/memory_estimate.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "backend/tensor.h"
#include "core/checked.h"
#include "core/error.h"
#include "model/params.h"

namespace hm {

namespace {

int64_t g_limit = 0;  // --max-memory; 0: none

int64_t mul(std::initializer_list<int64_t> f, const char* what) { return checked_mul(f, what); }
int64_t add(int64_t a, int64_t b, const char* what) { return checked_add(a, b, what); }

// Floats per token that one sequence's training forward keeps for its backward in layer i
// (model_grad.cpp's LayerActs), the selective-scan states excepted.
int64_t train_floats_per_token(const ModelConfig& c, int i) {
  const int64_t D = c.d_model, E = c.d_inner(), N = c.d_state, R = c.resolved_dt_rank();
  const int64_t H = c.n_heads, KW = int64_t(c.n_kv_heads) * c.head_dim();
  int64_t n = 2 * D + 1;                                               // h, u, rstd
  if (c.has_bridge(i)) n += c.inner_dim(i - 1) + 1;                    // bridge input, rstd
  if (c.has_mamba_path(i)) n += 6 * E + R + 2 * N;                     // x z xc dt yg, dt_r B C
  if (c.has_attention_path(i)) n += 2 * H * c.head_dim() + 2 * KW + H;  // q inner, k v, lse
  if (c.is_true(i)) n += 4 * D + kRouterFeatures + 8;                  // path rows, router
  if (c.d_ff > 0) n += 2 * D + 1 + 3 * int64_t(c.d_ff);                // h2 m rstd, g u a
  return n;
}

}  // namespace

int64_t MemoryEstimate::total() const {
  int64_t t = 0;
  for (int64_t part : {weights, gradients, optimizer, kv_cache, state, workspace, activations})
    t = add(t, part, "total memory");
  return t;
}

std::string format_bytes(int64_t bytes) {
  char buf[32];
  const double b = double(bytes);
  if (b >= 1 << 30) std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1 << 30));
  else if (b >= 1 << 20) std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1 << 20));
  else if (b >= 1 << 10) std::snprintf(buf, sizeof buf, "%.1f KiB", b / (1 << 10));
  else std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(bytes));
  return buf;
}

std::string MemoryEstimate::describe() const {
  std::string s;
  auto part = [&](const char* name, int64_t v) {
    if (v > 0) s += detail::cat(s.empty() ? "" : " + ", name, " ", format_bytes(v));
  };
  part("weights", weights);
  part("gradients", gradients);
  part("optimizer state", optimizer);
  part("KV cache", kv_cache);
  part("recurrent state", state);
  part("workspace", workspace);
  part("activations", activations);
  return s + " = " + format_bytes(total());
}

MemoryEstimate estimate_memory(const ModelConfig& c, const RunShape& s) {
  validate(c);  // bounded fields: every product below starts from a sane value
  HM_CHECK(s.slots >= 0 && s.ctx >= 0 && s.forward_tokens >= 0 && s.logit_rows >= 0 && s.train_batch >= 0 &&
               s.seq_len >= 0 && s.threads >= 1 && s.scan_chunk >= 0 && (s.kv_bytes == 2 || s.kv_bytes == 4),
           "memory estimate: invalid run shape");
  const int64_t D = c.d_model, E = c.d_inner(), N = c.d_state, K = c.d_conv, V = c.vocab_size;
  const int64_t H = c.n_heads, hd = c.head_dim(), KW = int64_t(c.n_kv_heads) * hd, F = c.d_ff;
  const int64_t P = c.resolved_dt_rank() + 2 * N, S = std::max(E, H * hd);
  MemoryEstimate m;

  // Params: each tensor padded to 16 floats; prepare() keeps A = -exp(A_log) per Mamba path.
  int64_t arena = 0;
  for (const ParamSpec& p : param_layout(c)) arena = add(arena, (p.numel() + 15) / 16 * 16, "parameter count");
  arena = mul({arena, 4}, "weight bytes");
  m.weights = arena;
  for (int i = 0; i < c.n_layers; ++i)
    if (!c.is_attention(i))
      m.weights = add(m.weights, mul({c.is_mamba2(i) ? c.mamba2_heads() : E * N, 4}, "weight bytes"), "weight bytes");
  if (s.weight_format != DType::F32) {
    // The linear weights HybridModel::linear_weights() lists, packed by its rule.
    std::vector<std::array<int64_t, 2>> lin = {{V, D}};
    for (int i = 0; i < c.n_layers; ++i) {
      if (c.is_mamba2(i)) lin.insert(lin.end(), {{c.mamba2_in_proj_rows(), D}, {D, E}});
      else if (c.has_mamba_path(i))
        lin.insert(lin.end(), {{2 * E, D}, {P, E}, {E, c.resolved_dt_rank()}, {D, E}});
      if (c.has_attention_path(i)) lin.insert(lin.end(), {{H * hd, D}, {KW, D}, {KW, D}, {D, H * hd}});
      if (F > 0) lin.insert(lin.end(), {{F, D}, {F, D}, {D, F}});
      if (c.has_bridge(i)) lin.push_back({D, c.inner_dim(i - 1)});
    }
    for (size_t j = 0; j < lin.size(); ++j) {
      const auto [rows, cols] = lin[j];
      if (is_packed(s.weight_format) && cols % 32 != 0) continue;  // stays float32
      const int64_t row = is_packed(s.weight_format) ? int64_t(packed_row_bytes(s.weight_format, int(cols))) : 2 * cols;
      m.weights = add(m.weights, mul({rows, row}, "weight bytes"), "weight bytes");
      if (s.floats_released && !(j == 0 && c.tie_embeddings)) m.weights -= rows * cols * 4;
    }
  }

  // Inference memory, as HybridMemory allocates it.
  if (s.slots > 0) {
    const int64_t kv_row_bytes = (mul({s.ctx, KW, s.kv_bytes}, "KV cache bytes") + 3) / 4 * 4;
    for (int i = 0; i < c.n_layers; ++i) {
      if (c.has_attention_path(i))
        m.kv_cache = add(m.kv_cache, mul({2, s.slots, kv_row_bytes}, "KV cache bytes"), "KV cache bytes");
      if (c.has_mamba_path(i))
        m.state = add(m.state, mul({s.slots, int64_t(c.conv_channels(i)) * (K - 1) + E * N, 4}, "recurrent state bytes"),
                      "recurrent state bytes");
      if (c.is_true(i))  // analyzer [D + 1] and x [D]; the K/V row count at each position (host)
        m.state = add(m.state, mul({s.slots, 2 * D + 1 + s.ctx + 1, 4}, "route state bytes"), "route state bytes");
    }
  }
  if (s.forward_tokens > 0 || s.logit_rows > 0) {
    // HybridModel::forward's workspace buffers, per token.
    int64_t per_token = D + std::max(D, S) + 2 * S + D + 2 * E + E + P + E + H * hd + 2 * KW;
    if (!c.true_layers.empty()) per_token += 3 * D + 1;  // path rows, router logits
    if (!c.mamba2_layers.empty())  // wider in_proj and conv outputs, and the scan's output
      per_token += std::max<int64_t>(0, c.mamba2_in_proj_rows() - 2 * E) + std::max<int64_t>(0, c.mamba2_conv_dim() - E) + E;
    if (F > 0) per_token += 3 * std::max<int64_t>({F, c.moe_shared_ff, c.moe_width()});
    if (c.mamba_proj_bias) per_token += 1;  // the zero row indices the biases are added through
    if (c.true_layers.empty() && (c.residual_multiplier != 1.0f || c.embedding_multiplier != 1.0f))
      per_token += D;  // their scratch (ym), which true and MoE layers reserve anyway
    m.workspace = add(mul({s.forward_tokens, per_token, 4}, "workspace bytes"),
                      mul({s.logit_rows, V, 4}, "logits bytes"), "workspace bytes");
  }

  // Training: gradients (thread 0 into the model's gradient arena, each other thread into its
  // own), AdamW's m and v, and per thread one sequence's activations, its head gradient and logits.
  if (s.train_batch > 0) {
    const int64_t nt = std::min<int64_t>(s.threads, s.train_batch), L = s.seq_len;
    if (!s.forward_only) {
      m.gradients = mul({nt, arena}, "gradient bytes");
      m.optimizer = mul({2, arena}, "optimizer state bytes");
    }
    int64_t per_seq = 0;  // floats
    for (int i = 0; i < c.n_layers; ++i) {
      int64_t layer = mul({L, train_floats_per_token(c, i)}, "activation bytes");
      if (c.has_mamba_path(i)) {
        // Scan states: every position's, or one per scan_chunk plus one chunk recomputed.
        const int64_t kept = s.scan_chunk > 0 ? (L + s.scan_chunk - 1) / s.scan_chunk + s.scan_chunk : L;
        layer = add(layer, mul({std::min(kept, L) + 1, E, N}, "activation bytes"), "activation bytes");
      }
      // Gradient checkpointing: every layer's input stream, and the largest layer's activations.
      per_seq = s.grad_ckpt ? std::max(per_seq, layer) : add(per_seq, layer, "activation bytes");
    }
    if (s.grad_ckpt) per_seq = add(per_seq, mul({c.n_layers + 2, L, D}, "activation bytes"), "activation bytes");
    // BatchGrad's (train/batch_grad.cpp) stream, block output, final norm, bridge projection and
    // the backward's scratch, held once per thread: 8 [L, D] and 2 [L, S] buffers, and per layer
    // kind its backward's (Mamba 4 [L, E] + [L, P]; attention 2 [L, H hd] + 2 [L, KW]; MLP
    // 3 [L, F]; true layers 5 [L, D]).
    bool any_mamba = false, any_attn = false, any_true = false;
    for (int i = 0; i < c.n_layers; ++i) {
      any_mamba = any_mamba || c.has_mamba_path(i);
      any_attn = any_attn || c.has_attention_path(i);
      any_true = any_true || c.is_true(i);
    }
    int64_t scratch = 8 * D + 2 * S;
    if (any_mamba) scratch += 4 * E + P;
    if (any_attn) scratch += 2 * H * hd + 2 * KW;
    if (F > 0) scratch += 3 * F;
    if (any_true) scratch += 5 * D;
    per_seq = add(per_seq, mul({L, scratch}, "activation bytes"), "activation bytes");
    per_seq = add(per_seq, mul({L, V}, "logits bytes"), "activation bytes");
    m.activations = mul({nt, per_seq, 4}, "activation bytes");
    // The whole batch's input and target token ids (int32), drawn before the threads split it.
    m.activations = add(m.activations, mul({2, s.train_batch, L, 4}, "token batch bytes"), "activation bytes");
  }
  return m;
}

int64_t parse_memory_size(const std::string& text) {
  auto bad = [&] {
    return Error(detail::cat("memory size '", text, "' must be a number with an optional unit K, M, G or T ",
                             "(powers of 1024), e.g. 512M or 2G"));
  };
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    throw bad();
  }
  std::string unit = text.substr(used);
  for (char& ch : unit) ch = char(std::toupper(static_cast<unsigned char>(ch)));
  if (unit.size() > 1 && unit.back() == 'B') unit.pop_back();
  if (unit.size() > 1 && unit.back() == 'I') unit.pop_back();
  double scale = 1;
  if (unit == "K") scale = 1024.0;
  else if (unit == "M") scale = 1024.0 * 1024;
  else if (unit == "G") scale = 1024.0 * 1024 * 1024;
  else if (unit == "T") scale = 1024.0 * 1024 * 1024 * 1024;
  else if (!unit.empty() && unit != "B") throw bad();
  const double bytes = v * scale;
  if (!std::isfinite(bytes) || bytes < 1 || bytes > 9.0e18 || text.empty() || std::isspace(static_cast<unsigned char>(text[0])))
    throw bad();
  return int64_t(bytes);
}

void set_memory_limit(int64_t bytes) {
  HM_CHECK(bytes >= 0, "memory limit must be >= 0, got ", bytes);
  g_limit = bytes;
}

int64_t available_memory_bytes() {
  int64_t avail = -1;
  std::ifstream f("/proc/meminfo");
  for (std::string line; std::getline(f, line);) {
    long long kb = 0;
    if (std::sscanf(line.c_str(), "MemAvailable: %lld kB", &kb) == 1) {
      avail = int64_t(kb) * 1024;
      break;
    }
  }
  // A container's limit (cgroup v2) may be far below the host's free memory.
  std::ifstream lim("/sys/fs/cgroup/memory.max"), cur("/sys/fs/cgroup/memory.current");
  long long max_b = 0, cur_b = 0;
  if (lim >> max_b && cur >> cur_b && max_b > 0) {
    const int64_t room = std::max<int64_t>(0, int64_t(max_b) - int64_t(cur_b));
    avail = avail < 0 ? room : std::min(avail, room);
  }
  return avail;
}

void check_memory(const MemoryEstimate& e, const std::string& what) {
  const int64_t need = e.total();
  if (g_limit > 0)
    HM_CHECK(need <= g_limit, what, " needs about ", format_bytes(need), " (", e.describe(),
             "), more than --max-memory ", format_bytes(g_limit), "; use a smaller model, --ctx or batch");
  const int64_t avail = available_memory_bytes();
  if (avail >= 0)
    HM_CHECK(need <= avail, what, " needs about ", format_bytes(need), " (", e.describe(), "), more than the ",
             format_bytes(avail), " of memory available; use a smaller model, --ctx or batch");
}

}  // namespace hm
