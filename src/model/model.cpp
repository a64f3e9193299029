#include "model/model.h"

#include <cmath>
#include <filesystem>
#include <set>

#include "core/error.h"

namespace hm {

HybridModel::HybridModel(const ModelConfig& c, Backend& be) : cfg_(c), be_(be), params_(c) {
  validate(c);
  HM_CHECK(be.device() == Device::CPU, "model: parameters are host-resident; the ", be.name(),
           " backend cannot run this model yet");
}

void HybridModel::prepare() {
  A_.assign(size_t(cfg_.n_layers), {});
  for (int i = 0; i < cfg_.n_layers; ++i) {
    if (cfg_.is_attention(i)) continue;
    const LayerWeights& w = params_.layer(i);
    A_[size_t(i)].resize(size_t(cfg_.d_inner()) * cfg_.d_state);
    be_.neg_exp(A_[size_t(i)].data(), w.A_log, int64_t(A_[size_t(i)].size()));
  }
}

// h += gate * (rmsnorm(src) @ proj^T): the previous layer type's inner representation,
// injected into the residual stream in front of a layer of the other type (docs/STATE_BRIDGES.md).
void HybridModel::bridge(int layer, int T) {
  const LayerWeights& w = params_.layer(layer);
  const int S = cfg_.inner_dim(layer - 1), D = cfg_.d_model;
  be_.rmsnorm(ws_.u.data(), ws_.inner_prev.data(), w.bridge_norm, T, S, cfg_.norm_eps);
  be_.linear(ws_.rows.data(), D, ws_.u.data(), S, w.bridge_proj, T, D, S, false);
  be_.add_scaled_rows(ws_.h.data(), ws_.rows.data(), w.bridge_gate, T, D);
}

void HybridModel::mamba_layer(int layer, const Batch& b, const std::vector<int>& start,
                              HybridMemory& mem) {
  const LayerWeights& w = params_.layer(layer);
  const int T = int(b.tokens.size()), D = cfg_.d_model, E = cfg_.d_inner(), N = cfg_.d_state;
  const int K = cfg_.d_conv, R = cfg_.resolved_dt_rank(), P = R + 2 * N;
  float* xz = ws_.xz.data();     // F32 [T, 2E]: x | z
  float* xc = ws_.xc.data();     // F32 [T, E]: silu(conv(x))
  float* dbc = ws_.dbc.data();   // F32 [T, R + 2N]: dt_r | B | C
  float* dt = ws_.dt.data();     // F32 [T, E]: dt_proj(dt_r), softplus applied in the scan
  float* y = ws_.inner.data();   // F32 [T, E]: gated scan output
  be_.linear(xz, 2 * E, ws_.u.data(), D, w.in_proj, T, 2 * E, D, false);          // xz = in_proj(u)
  for (size_t s = 0; s < b.seqs.size(); ++s) {
    const int t0 = start[s], L = b.seqs[s].n_tokens;
    be_.conv1d_silu(xc + size_t(t0) * E, E, mem.recurrent().conv(layer, b.seqs[s].slot),
                    xz + size_t(t0) * 2 * E, 2 * E, w.conv_w, w.conv_b, L, E, K);
  }
  be_.linear(dbc, P, xc, E, w.x_proj, T, P, E, false);                               // x_proj(x)
  be_.linear(dt, E, dbc, P, w.dt_w, T, E, R, false);                                 // dt_proj.weight @ dt_r
  for (size_t s = 0; s < b.seqs.size(); ++s) {
    const int t0 = start[s], L = b.seqs[s].n_tokens;
    be_.selective_scan(y + size_t(t0) * E, E, mem.recurrent().ssm(layer, b.seqs[s].slot),
                       xc + size_t(t0) * E, E, dt + size_t(t0) * E, E, w.dt_b, A_[size_t(layer)].data(),
                       dbc + size_t(t0) * P + R, dbc + size_t(t0) * P + R + N, P, w.Dskip,
                       xz + size_t(t0) * 2 * E + E, 2 * E, L, E, N);
  }
  be_.linear(ws_.h.data(), D, y, E, w.out_proj, T, D, E, true);                      // h += out_proj(y)
}

void HybridModel::attention_layer(int layer, const Batch& b, const std::vector<int>& start,
                                  HybridMemory& mem) {
  const LayerWeights& w = params_.layer(layer);
  const int T = int(b.tokens.size()), D = cfg_.d_model, H = cfg_.n_heads, G = cfg_.n_kv_heads;
  const int hd = cfg_.head_dim(), QW = H * hd, KW = G * hd;
  float* q = ws_.q.data();       // F32 [T, H*hd]
  float* k = ws_.k.data();       // F32 [T, G*hd]
  float* v = ws_.v.data();       // F32 [T, G*hd]
  float* ctx = ws_.inner.data(); // F32 [T, H*hd]
  be_.linear(q, QW, ws_.u.data(), D, w.wq, T, QW, D, false);
  be_.linear(k, KW, ws_.u.data(), D, w.wk, T, KW, D, false);
  be_.linear(v, KW, ws_.u.data(), D, w.wv, T, KW, D, false);
  for (size_t s = 0; s < b.seqs.size(); ++s) {
    const int t0 = start[s], L = b.seqs[s].n_tokens, slot = b.seqs[s].slot, pos0 = mem.pos(slot);
    float* qs = q + size_t(t0) * QW;
    float* ks = k + size_t(t0) * KW;
    if (cfg_.rope) {
      be_.rope(qs, QW, L, H, hd, pos0, cfg_.rope_theta);
      be_.rope(ks, KW, L, G, hd, pos0, cfg_.rope_theta);
    }
    // The new K/V rows join the cache first; attention then reads every position from it,
    // so prefill and decode see identical (possibly half-precision) keys and values.
    if (mem.kv().type() == KvType::F16) {
      auto* kc = static_cast<uint16_t*>(mem.kv().k(layer, slot));
      auto* vc = static_cast<uint16_t*>(mem.kv().v(layer, slot));
      be_.store_f16(kc + size_t(pos0) * KW, KW, ks, KW, L, KW);
      be_.store_f16(vc + size_t(pos0) * KW, KW, v + size_t(t0) * KW, KW, L, KW);
      be_.attention_f16kv(ctx + size_t(t0) * QW, QW, qs, QW, kc, vc, L, pos0, H, G, hd);
    } else {
      auto* kc = static_cast<float*>(mem.kv().k(layer, slot));
      auto* vc = static_cast<float*>(mem.kv().v(layer, slot));
      be_.copy_rows(kc + size_t(pos0) * KW, KW, ks, KW, L, KW);
      be_.copy_rows(vc + size_t(pos0) * KW, KW, v + size_t(t0) * KW, KW, L, KW);
      be_.attention(ctx + size_t(t0) * QW, QW, qs, QW, kc, vc, L, pos0, H, G, hd);
    }
  }
  be_.linear(ws_.h.data(), D, ctx, QW, w.wo, T, D, QW, true);                        // h += o_proj(ctx)
}

void HybridModel::mlp(int layer, int T) {
  const LayerWeights& w = params_.layer(layer);
  const int D = cfg_.d_model, F = cfg_.d_ff;
  be_.rmsnorm(ws_.u.data(), ws_.h.data(), w.mlp_norm, T, D, cfg_.norm_eps);
  be_.linear(ws_.g.data(), F, ws_.u.data(), D, w.w_gate, T, F, D, false);
  be_.linear(ws_.up.data(), F, ws_.u.data(), D, w.w_up, T, F, D, false);
  be_.swiglu(ws_.act.data(), F, ws_.g.data(), ws_.up.data(), F, T, F);
  be_.linear(ws_.h.data(), D, ws_.act.data(), F, w.w_down, T, D, F, true);
}

void HybridModel::forward(const Batch& b, HybridMemory& mem, std::vector<float>& logits) {
  const int T = int(b.tokens.size()), D = cfg_.d_model, V = cfg_.vocab_size;
  HM_CHECK(!b.seqs.empty() && T > 0, "forward: empty batch");
  HM_CHECK(!A_.empty(), "forward: model not prepared (call prepare() after init or load)");
  // Validate the whole batch before touching any state.
  std::vector<int> start;
  std::set<int> slots;
  int t = 0;
  for (const SeqChunk& s : b.seqs) {
    HM_CHECK(s.slot >= 0 && s.slot < mem.n_slots(), "forward: sequence slot ", s.slot,
             " out of range [0, ", mem.n_slots(), ")");
    HM_CHECK(slots.insert(s.slot).second, "forward: slot ", s.slot, " appears twice in one batch");
    HM_CHECK(s.n_tokens > 0, "forward: a chunk for slot ", s.slot, " has no tokens");
    HM_CHECK(mem.pos(s.slot) + s.n_tokens <= mem.max_ctx(), "forward: sequence in slot ", s.slot,
             " would reach ", mem.pos(s.slot) + s.n_tokens, " tokens, over the context size ",
             mem.max_ctx());
    start.push_back(t);
    t += s.n_tokens;
  }
  HM_CHECK(t == T, "forward: chunks cover ", t, " tokens but the batch holds ", T);
  for (int i = 0; i < T; ++i)
    HM_CHECK(b.tokens[size_t(i)] >= 0 && b.tokens[size_t(i)] < V, "forward: token id ",
             b.tokens[size_t(i)], " at position ", i, " is outside the vocabulary [0, ", V, ")");

  const int E = cfg_.d_inner(), S = std::max(E, cfg_.n_heads * cfg_.head_dim());
  const int P = cfg_.resolved_dt_rank() + 2 * cfg_.d_state, KW = cfg_.n_kv_heads * cfg_.head_dim();
  const size_t uT = size_t(T);
  ws_.h.reserve(be_, uT * D);
  ws_.u.reserve(be_, uT * std::max(D, S));
  ws_.inner.reserve(be_, uT * S);
  ws_.inner_prev.reserve(be_, uT * S);
  ws_.rows.reserve(be_, uT * D);
  ws_.xz.reserve(be_, uT * 2 * E);
  ws_.xc.reserve(be_, uT * E);
  ws_.dbc.reserve(be_, uT * P);
  ws_.dt.reserve(be_, uT * E);
  ws_.q.reserve(be_, uT * cfg_.n_heads * cfg_.head_dim());
  ws_.k.reserve(be_, uT * KW);
  ws_.v.reserve(be_, uT * KW);
  if (cfg_.d_ff > 0) {
    ws_.g.reserve(be_, uT * cfg_.d_ff);
    ws_.up.reserve(be_, uT * cfg_.d_ff);
    ws_.act.reserve(be_, uT * cfg_.d_ff);
  }

  be_.embedding(ws_.h.data(), params_.embeddings(), b.tokens.data(), T, D);
  for (int i = 0; i < cfg_.n_layers; ++i) {
    if (cfg_.has_bridge(i)) bridge(i, T);
    be_.rmsnorm(ws_.u.data(), ws_.h.data(), params_.layer(i).norm, T, D, cfg_.norm_eps);
    if (cfg_.is_attention(i))
      attention_layer(i, b, start, mem);
    else
      mamba_layer(i, b, start, mem);
    if (cfg_.d_ff > 0) mlp(i, T);
    std::swap(ws_.inner, ws_.inner_prev);  // this layer's inner output feeds the next bridge
  }
  for (const SeqChunk& s : b.seqs) mem.advance(s.slot, s.n_tokens);

  // Final norm and LM head only on the rows whose logits are wanted.
  int n_rows = T;
  const float* hrows = ws_.h.data();
  if (!b.logits_all) {
    n_rows = int(b.seqs.size());
    for (size_t s = 0; s < b.seqs.size(); ++s)
      be_.copy_rows(ws_.rows.data() + s * D, D, ws_.h.data() + size_t(start[s] + b.seqs[s].n_tokens - 1) * D,
                    D, 1, D);
    hrows = ws_.rows.data();
  }
  be_.rmsnorm(ws_.u.data(), hrows, params_.norm_f(), n_rows, D, cfg_.norm_eps);
  ws_.logits_dev.reserve(be_, size_t(n_rows) * V);
  be_.linear(ws_.logits_dev.data(), V, ws_.u.data(), D, params_.lm_head(), n_rows, V, D, false);
  logits.resize(size_t(n_rows) * V);
  be_.to_host(logits.data(), ws_.logits_dev.data(), logits.size() * sizeof(float));
}

std::unique_ptr<HybridModel> load_model(const std::string& dir, Backend& be) {
  namespace fs = std::filesystem;
  HM_CHECK(fs::is_directory(dir), "model: '", dir, "' is not a directory (expected a checkpoint folder "
           "with config.json and model.safetensors)");
  const ModelConfig c = load_config((fs::path(dir) / "config.json").string());
  auto m = std::make_unique<HybridModel>(c, be);
  load_params(m->params(), (fs::path(dir) / "model.safetensors").string());
  m->prepare();
  return m;
}

void save_model(const HybridModel& m, const std::string& dir, const std::string& stored_dtype) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  save_params(m.params(), (fs::path(dir) / "model.safetensors").string(), stored_dtype);
  save_config((fs::path(dir) / "config.json").string(), m.config());
}

}  // namespace hm
