#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

void HybridModel::mamba_path(int layer, const float* x, int n, const std::vector<PathSeg>& segs,
                             float* out, bool accumulate, HybridMemory& mem) {
  const LayerWeights& w = params_.layer(layer);
  const int D = cfg_.d_model, E = cfg_.d_inner(), N = cfg_.d_state;
  const int K = cfg_.d_conv, R = cfg_.resolved_dt_rank(), P = R + 2 * N;
  float* xz = ws_.xz.data();     // F32 [n, 2E]: x | z
  float* xc = ws_.xc.data();     // F32 [n, E]: silu(conv(x))
  float* dbc = ws_.dbc.data();   // F32 [n, R + 2N]: dt_r | B | C
  float* dt = ws_.dt.data();     // F32 [n, E]: dt_proj(dt_r), softplus applied in the scan
  float* y = ws_.inner.data();   // F32 [n, E]: gated scan output
  be_.linear(xz, 2 * E, x, D, w.in_proj, n, 2 * E, D, false);                       // xz = in_proj(x)
  for (const PathSeg& g : segs) {
    if (g.n == 0) continue;
    be_.conv1d_silu(xc + size_t(g.row0) * E, E, mem.recurrent().conv(layer, g.slot),
                    xz + size_t(g.row0) * 2 * E, 2 * E, w.conv_w, w.conv_b, g.n, E, K);
  }
  be_.linear(dbc, P, xc, E, w.x_proj, n, P, E, false);                               // x_proj(x)
  be_.linear(dt, E, dbc, P, w.dt_w, n, E, R, false);                                 // dt_proj.weight @ dt_r
  for (const PathSeg& g : segs) {
    if (g.n == 0) continue;
    const size_t t0 = size_t(g.row0);
    be_.selective_scan(y + t0 * E, E, mem.recurrent().ssm(layer, g.slot), xc + t0 * E, E,
                       dt + t0 * E, E, w.dt_b, A_[size_t(layer)].data(), dbc + t0 * P + R,
                       dbc + t0 * P + R + N, P, w.Dskip, xz + t0 * 2 * E + E, 2 * E, g.n, E, N);
  }
  be_.linear(out, D, y, E, w.out_proj, n, D, E, accumulate);                         // out (+)= out_proj(y)
}

void HybridModel::attention_path(int layer, const float* x, int n, const std::vector<PathSeg>& segs,
                                 float* out, bool accumulate, HybridMemory& mem) {
  const LayerWeights& w = params_.layer(layer);
  const int D = cfg_.d_model, H = cfg_.n_heads, G = cfg_.n_kv_heads;
  const int hd = cfg_.head_dim(), QW = H * hd, KW = G * hd;
  float* q = ws_.q.data();       // F32 [n, H*hd]
  float* k = ws_.k.data();       // F32 [n, G*hd]
  float* v = ws_.v.data();       // F32 [n, G*hd]
  float* ctx = ws_.inner.data(); // F32 [n, H*hd]
  be_.linear(q, QW, x, D, w.wq, n, QW, D, false);
  be_.linear(k, KW, x, D, w.wk, n, KW, D, false);
  be_.linear(v, KW, x, D, w.wv, n, KW, D, false);
  for (const PathSeg& g : segs) {
    if (g.n == 0) continue;
    const int t0 = g.row0, L = g.n, slot = g.slot, pos0 = g.pos0;
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
    mem.kv().set_len(layer, slot, pos0 + L);
  }
  be_.linear(out, D, ctx, QW, w.wo, n, D, QW, accumulate);                           // out (+)= o_proj(ctx)
}

void HybridModel::mamba_layer(int layer, const Batch& b, const std::vector<int>& start,
                              HybridMemory& mem) {
  std::vector<PathSeg> segs;
  for (size_t s = 0; s < b.seqs.size(); ++s) segs.push_back({b.seqs[s].slot, start[s], b.seqs[s].n_tokens, 0});
  mamba_path(layer, ws_.u.data(), int(b.tokens.size()), segs, ws_.h.data(), true, mem);  // h += mixer(u)
}

void HybridModel::attention_layer(int layer, const Batch& b, const std::vector<int>& start,
                                  HybridMemory& mem) {
  std::vector<PathSeg> segs;
  for (size_t s = 0; s < b.seqs.size(); ++s)
    segs.push_back({b.seqs[s].slot, start[s], b.seqs[s].n_tokens, mem.pos(b.seqs[s].slot)});
  attention_path(layer, ws_.u.data(), int(b.tokens.size()), segs, ws_.h.data(), true, mem);
}

// A true-hybrid layer (docs/TRUE_HYBRID.md, "Forward"). Each path runs once over the rows of
// the whole batch routed to it, gathered into a compact buffer: one GEMM per projection for
// all sequences, and a path no token chose does no work at all. The conv and scan (Mamba) and
// RoPE + attention run per sequence on its compacted subsequence, continuing that sequence's
// own state, so tokens a path skips leave its state untouched.
// The router, gathers, scatters and gates are O(T * D) host loops next to the paths'
// O(T * D * E): parameters are host-resident and the model requires a CPU backend, so every
// buffer is host memory (a device backend would move these into ops).
void HybridModel::true_layer(int layer, const Batch& b, const std::vector<int>& start,
                             HybridMemory& mem) {
  const LayerWeights& w = params_.layer(layer);
  const int T = int(b.tokens.size()), D = cfg_.d_model, nseq = int(b.seqs.size());
  const th::Mode mode = th::mode_from_config(cfg_);
  const bool chunked = cfg_.routing_granularity == "chunk";
  const float* u = ws_.u.data();  // F32 [T, D]
  RouteState& rs = mem.route();

  // Routes, chunk by chunk, each continuing its sequence's analyzer state.
  routing_.resize(size_t(nseq));
  logit_.resize(size_t(T));
  feats_.resize(size_t(T) * kRouterFeatures);
  std::vector<int> moff(size_t(nseq) + 1, 0), aoff(size_t(nseq) + 1, 0);  // chunk -> first compact row
  for (int s = 0; s < nseq; ++s) {
    const int slot = b.seqs[size_t(s)].slot, t0 = start[size_t(s)], L = b.seqs[size_t(s)].n_tokens;
    th::router_forward(logit_.data() + t0, feats_.data() + size_t(t0) * kRouterFeatures,
                       rs.ema(layer, slot), rs.chunk_logit(layer, slot), u + size_t(t0) * D, L, D,
                       int64_t(mem.pos(slot)), w.router_w, w.router_feat, w.router_b, chunked,
                       cfg_.routing_chunk);
    th::Routing<float>& rt = routing_[size_t(s)];
    th::decide_routes(rt, logit_.data() + t0, L, int64_t(mem.pos(slot)), mode, force_f_);
    moff[size_t(s) + 1] = moff[size_t(s)] + int(rt.mamba_idx.size());
    aoff[size_t(s) + 1] = aoff[size_t(s)] + int(rt.attn_idx.size());
  }
  const int nm = moff[size_t(nseq)], na = aoff[size_t(nseq)];
  midx_.assign(size_t(T), -1);
  aidx_.assign(size_t(T), -1);
  gm_.resize(size_t(T));
  ga_.resize(size_t(T));
  for (int s = 0; s < nseq; ++s) {
    const th::Routing<float>& rt = routing_[size_t(s)];
    const int t0 = start[size_t(s)];
    std::copy(rt.gm.begin(), rt.gm.end(), gm_.begin() + t0);
    std::copy(rt.ga.begin(), rt.ga.end(), ga_.begin() + t0);
    for (size_t i = 0; i < rt.mamba_idx.size(); ++i) midx_[size_t(t0 + rt.mamba_idx[i])] = moff[size_t(s)] + int(i);
    for (size_t i = 0; i < rt.attn_idx.size(); ++i) aidx_[size_t(t0 + rt.attn_idx[i])] = aoff[size_t(s)] + int(i);
  }
  if (trace_) {
    const size_t li = size_t(std::find(trace_->layers.begin(), trace_->layers.end(), layer) - trace_->layers.begin());
    HM_ASSERT(li < trace_->layers.size());
    for (int s = 0; s < nseq; ++s) {
      const th::Routing<float>& rt = routing_[size_t(s)];
      for (int t = 0; t < b.seqs[size_t(s)].n_tokens; ++t) {
        trace_->p[li].push_back(rt.p[size_t(t)]);
        trace_->route[li].push_back(rt.route[size_t(t)]);
        trace_->attention_share[li].push_back(th::attention_share(rt, t, mode));
      }
    }
  }

  float* gath = ws_.gath.data();  // F32 [nm or na, D]: the path's input rows
  float* ym = ws_.ym.data();      // F32 [nm, D]: Mamba path output, compact
  float* ya = ws_.ya.data();      // F32 [na, D]: attention path output, compact
  const size_t rowb = sizeof(float) * size_t(D);
  if (nm > 0) {
    // Every token runs Mamba (both, soft, or a hard batch that chose it throughout): u as is.
    const float* um = u;
    if (nm < T) {
#pragma omp parallel for if (int64_t(T) * D > (1 << 16))
      for (int t = 0; t < T; ++t)
        if (midx_[size_t(t)] >= 0) std::memcpy(gath + size_t(midx_[size_t(t)]) * D, u + size_t(t) * D, rowb);
      um = gath;
    }
    std::vector<PathSeg> segs;
    for (int s = 0; s < nseq; ++s)
      segs.push_back({b.seqs[size_t(s)].slot, moff[size_t(s)], moff[size_t(s) + 1] - moff[size_t(s)], 0});
    mamba_path(layer, um, nm, segs, ym, false, mem);
  }
  if (na > 0) {
    // v_t = u_t + exchange * x_t, x_t the latest Mamba output at or before t: this call's, else
    // the one the sequence carried in from its previous call.
    std::vector<const float*> xsrc(static_cast<size_t>(na));  // x_t of each attention row
    for (int s = 0; s < nseq; ++s) {
      const th::Routing<float>& rt = routing_[size_t(s)];
      const float* carried = rs.last_mamba(layer, b.seqs[size_t(s)].slot);
      for (size_t i = 0; i < rt.attn_idx.size(); ++i)
        xsrc[size_t(aoff[size_t(s)]) + i] = rt.carry[i] >= 0 ? ym + size_t(moff[size_t(s)] + rt.carry[i]) * D : carried;
    }
#pragma omp parallel for if (int64_t(T) * D > (1 << 16))
    for (int t = 0; t < T; ++t) {
      const int a = aidx_[size_t(t)];
      if (a < 0) continue;
      const float* ut = u + size_t(t) * D;
      const float* xt = xsrc[size_t(a)];
      float* vt = gath + size_t(a) * D;
      for (int j = 0; j < D; ++j) vt[j] = ut[j] + w.exchange[j] * xt[j];
    }
    std::vector<PathSeg> segs;
    for (int s = 0; s < nseq; ++s) {
      const int slot = b.seqs[size_t(s)].slot;
      segs.push_back({slot, aoff[size_t(s)], aoff[size_t(s) + 1] - aoff[size_t(s)], mem.kv().len(layer, slot)});
    }
    attention_path(layer, gath, na, segs, ya, false, mem);
  }
  // The exchange state carries the sequence's last Mamba output into its next call.
  for (int s = 0; s < nseq; ++s)
    if (moff[size_t(s) + 1] > moff[size_t(s)])
      std::memcpy(rs.last_mamba(layer, b.seqs[size_t(s)].slot), ym + size_t(moff[size_t(s) + 1] - 1) * D, rowb);

  // h_t += gm_t fuse_mamba ym_t + ga_t fuse_attn ya_t, each term only where its path ran.
#pragma omp parallel for if (int64_t(T) * D > (1 << 16))
  for (int t = 0; t < T; ++t) {
    float* ht = ws_.h.data() + size_t(t) * D;
    if (const int m = midx_[size_t(t)]; m >= 0) {
      const float g = gm_[size_t(t)];
      const float* yt = ym + size_t(m) * D;
      for (int j = 0; j < D; ++j) ht[j] += g * w.fuse_mamba[j] * yt[j];
    }
    if (const int a = aidx_[size_t(t)]; a >= 0) {
      const float g = ga_[size_t(t)];
      const float* yt = ya + size_t(a) * D;
      for (int j = 0; j < D; ++j) ht[j] += g * w.fuse_attn[j] * yt[j];
    }
  }
}

void HybridModel::set_forced_attention_fraction(double f) {
  if (f < 0) {
    force_f_ = -1.0;
    return;
  }
  HM_CHECK(f <= 1.0, "forced attention fraction must be in [0, 1] (or < 0 to let the router decide), got ", f);
  HM_CHECK(!cfg_.true_layers.empty(), "forced attention fraction: the model has no true-hybrid layers");
  HM_CHECK(th::mode_from_config(cfg_) == th::Mode::Hard,
           "forced attention fraction: routes can only be forced with routing_mode \"hard\" (this "
           "model's is \"", cfg_.routing_mode, "\": every token runs both paths)");
  force_f_ = f;
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
  if (!cfg_.true_layers.empty()) {
    ws_.gath.reserve(be_, uT * D);
    ws_.ym.reserve(be_, uT * D);
    ws_.ya.reserve(be_, uT * D);
  }
  if (cfg_.d_ff > 0) {
    ws_.g.reserve(be_, uT * cfg_.d_ff);
    ws_.up.reserve(be_, uT * cfg_.d_ff);
    ws_.act.reserve(be_, uT * cfg_.d_ff);
  }

  if (trace_) {
    *trace_ = RouteTrace{};
    trace_->layers = cfg_.true_layers;
    std::sort(trace_->layers.begin(), trace_->layers.end());
    const size_t n = trace_->layers.size();
    trace_->p.resize(n);
    trace_->route.resize(n);
    trace_->attention_share.resize(n);
  }
  be_.embedding(ws_.h.data(), params_.embeddings(), b.tokens.data(), T, D);
  for (int i = 0; i < cfg_.n_layers; ++i) {
    if (cfg_.has_bridge(i)) bridge(i, T);
    be_.rmsnorm(ws_.u.data(), ws_.h.data(), params_.layer(i).norm, T, D, cfg_.norm_eps);
    if (cfg_.is_true(i))
      true_layer(i, b, start, mem);
    else if (cfg_.is_attention(i))
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
