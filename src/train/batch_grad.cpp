#include "train/batch_grad.h"

#include <algorithm>
#include <array>
#include <map>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/moe.h"
#include "model/true_hybrid.h"
#include "train/layout.h"
#include "train/model_grad.h"

namespace hm {

namespace {

// A backend buffer grown to hold rows x cols of t, viewed as that tensor.
Tensor act(Backend& be, Buffer& b, DType t, int rows, int cols) {
  b.reserve(be, std::max<size_t>(1, size_t(rows) * size_t(cols) * dtype_size(t)));
  return b.tensor(t, rows, cols);
}

// What one layer's forward keeps for its backward besides the stream entering it (docs/MODEL.md's
// names): views into one backend buffer (the layer's own, or with grad_ckpt the one slot every
// layer is computed in), each view aligned to kAlign bytes.
struct LayerActs {
  Tensor u;                               // rmsnorm(stream entering the layer, norm)
  Tensor x, z, xc, dt, yg, dbc;           // Mamba: conv input, gate, scan input, dt, y*silu(z), dt_r|B|C
  Tensor rbc, nbc;                        // mamba_bcdt_norm: dt_r, B, C copied out of dbc and normalized,
                                          // each a contiguous block (bcdt_blocks)
  void* scan = nullptr;                   // Mamba: the scan's saved states (scan_saved_bytes)
  Tensor q, k, v, lse, inner;             // attention (lse float32 [n, H])
  Tensor h2, m, g, up, a;                 // MLP: stream entering mlp_norm, its norm, gate, up, silu(gate)*up
  Tensor lg;                              // MoE: the router's logits (float32 [n, X])
  Tensor xe, ge, ue, ae, ye;              // MoE: the experts' n*k rows, expert by expert: input, gate, up,
                                          // silu(gate)*up, output
  Tensor sg, sup, sa;                     // MoE: the shared expert's gate, up, silu(gate)*up
  Tensor zxd, xbc, ys, yn;                // Mamba-2: in_proj's z | xBC | dt, silu(conv(xBC)), scan output, gated norm
  Tensor ynorm;                           // Mamba-2 norm before the gate: the normed scan output (w applied)
  Tensor bn;                              // the bridge's rmsnorm(source) (without grad_ckpt)
  Tensor um, ym, va, ya;                  // true layers: the Mamba path's input rows and output, the
                                          // attention path's input u + exchange * x and output
};

// The first `rows` rows of every [n, .] view (a true layer's paths run on compacted rows).
LayerActs first_rows(const LayerActs& s, int rows) {
  LayerActs r = s;
  for (Tensor* t : {&r.u, &r.x, &r.z, &r.xc, &r.dt, &r.yg, &r.dbc, &r.q, &r.k, &r.v, &r.lse, &r.inner, &r.um, &r.ym,
                    &r.va, &r.ya, &r.zxd, &r.xbc, &r.ys, &r.yn, &r.ynorm})
    if (!t->empty()) *t = t->rows_view(0, std::min(rows, t->rows));
  return r;
}

// A true layer's routing of the current batch (docs/TRUE_HYBRID.md): the router runs on the host
// (as inference's does) on the layer's normed input, per sequence from position 0; the paths
// and the fusion run as backend ops over compacted rows. The indices are global rows of the
// batch (m_rows, a_rows) or rows of the compacted path outputs (ex_dst into va, ex_src into ym).
struct TrueState {
  std::vector<std::vector<float>> feats, r;  // per sequence: analyzer features, routing logits
  std::vector<th::Routing<float>> rt;        // per sequence
  std::vector<double> pmean;                 // per sequence: mean_t p_t
  std::vector<int32_t> m_rows, a_rows, ex_dst, ex_src;
  std::vector<float> gm, ga;                 // the gates of m_rows' and a_rows' outputs
  Ragged rgm, rga;                           // the two paths' compacted sequences
  Buffer idx, gates;                         // device copies: [m_rows | a_rows], [gm | ga]
  int nm = 0, na = 0;
  const int32_t* d_m() const { return static_cast<const int32_t*>(idx.data()); }
  const int32_t* d_a() const { return d_m() + nm; }
  const float* d_gm() const { return static_cast<const float*>(gates.data()); }
  const float* d_ga() const { return d_gm() + nm; }
};

// An MoE layer's routing of the current batch (model/moe.h), and its rows grouped by expert.
struct MoeState {
  MoeRouting rt;
  std::vector<int32_t> idx;   // every expert's rows (tokens), expert by expert
  std::vector<float> gates;   // their gates
  std::vector<int> begin;     // [X + 1]: where each expert's rows start in idx
  std::vector<int32_t> slot;  // [n, k]: token t's j-th choice's position in idx
  Buffer d_idx, d_gates;      // device copies of idx and gates
};

constexpr size_t kAlign = 256;

// Lays out one layer's activations from base (nullptr: only counts); returns the bytes they take.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  Tensor take(DType t, int rows, int cols) {
    void* p = bytes(size_t(rows) * size_t(cols) * dtype_size(t));
    return {p, t, rows, cols};
  }
  void* bytes(size_t b) {
    char* p = base_ ? base_ + off_ : nullptr;
    off_ += (b + kAlign - 1) / kAlign * kAlign;
    return p;
  }
  size_t size() const { return off_; }

 private:
  char* base_;
  size_t off_ = 0;
};

}  // namespace

struct BatchGrad::Impl {
  Backend& be;
  Layout lo;
  DType ct;
  bool ckpt;
  const float* master = nullptr;
  Buffer wc;  // the compute copy of the weights (16-bit types only)
  const char* W = nullptr;
  float* G = nullptr;  // the gradient arena of the current call
  std::function<void(int64_t, int64_t)> grads_done;  // set_grads_done's callback
  Ragged rg;
  int n = 0;  // tokens of the current batch
  Buffer ids, tgts;
  std::vector<Buffer> hin;     // [n_layers] the stream entering each layer's pre-norm (after its bridge)
  std::vector<Buffer> arenas;  // each layer's LayerActs, or with ckpt one slot that any layer fits
  Buffer bnb;                  // ckpt: the bridge's rmsnorm(source), one bridge at a time
  Buffer h, mix, hn, p;  // stream, a block's output, the final norm, a bridge's projection
  Buffer dh, dtmp, dbridge, dy, dhn, dp;
  Buffer dyg, dxc, ddt, dz, ddbc;  // Mamba backward
  Buffer dnbc, drbc;               // mamba_bcdt_norm's backward: gradients of the normed and raw blocks
  Buffer dw_ones;                  // the weightless dt/B/C norms' discarded weight gradient
  std::map<float, Buffer> consts;  // const_row's rows, by value
  Buffer dres, hns;                // residual_multiplier's scaled gradient; logits_scaling's scaled norm
  Buffer dzxd, dxbc;               // Mamba-2 backward (with dyg, dz: the norm's and the scan's output gradients)
  Buffer zc, dzc, dnorm, dun, dvn; // Mamba-2 gate variants: z contiguous, its gradient, the unit norm, its gradient,
                                   // the normed output's gradient
  Buffer dinn, dq, dk, dv;         // attention backward
  Buffer rope_tmp;                 // partial rotary: the rotated channels of every head
  Buffer da, dg, dup;              // MLP backward
  Buffer dW_scratch;               // loss_sum's head gradient (discarded)
  std::vector<std::unique_ptr<TrueState>> tstate;  // [n_layers]: true layers' routing
  std::vector<std::unique_ptr<MoeState>> mstate;   // [n_layers]: MoE layers' routing
  Buffer dye, dxe;                                 // MoE backward: one expert's output and input gradients
  Buffer row_dot_out;                              // row_dots' output: MoE gates', true layers' dL/dp
  Buffer ex_a, ex_b, ex_c;                         // true layers' backward: gathered rows
  Buffer router_r, router_f;                       // true layers' router: logits [n], features [n, 2]
  bool freeze = false;                             // freeze_routing
  std::vector<int64_t> seq_count;  // counted targets per sequence (the budget loss's weights)
  double budget_scale = 0;         // grad_scale / total: a sequence's budget weight is cnt_b times it
  double inv_total = 0;            // 1 / total: the budget loss's weight per counted target
  double budget_loss = 0;          // the objective's budget term of the last forward
  bool recomputing = false;        // grad_ckpt's re-run of a layer (its budget term is counted once)
  Buffer dym, dya, dvv, dum, hostbuf;  // true layers' backward: path gradients, a host-made [n, D]

  int chunk;  // the scan's saved-state spacing (0: the backend's)
  Impl(Backend& b, const Params& layout, DType t, bool grad_ckpt, int scan_chunk)
      : be(b), lo(layout), ct(t), ckpt(grad_ckpt), chunk(scan_chunk) {}

  // Where layer i's tensors begin in the arena (Params keeps a layer's tensors together, after
  // the embedding and before the final norm and an untied head); i = n_layers: the final norm.
  int64_t layer_begin(int i) const {
    if (i == c().n_layers) return lo.norm_f;
    const LayerOffsets& o = lo.layers[size_t(i)];
    int64_t b = lo.norm_f;
    for (const int64_t off : {o.norm, o.in_proj, o.conv_w, o.conv_b, o.x_proj, o.dt_w, o.dt_b, o.A_log, o.Dskip,
                              o.out_proj, o.wq, o.wk, o.wv, o.wo, o.mlp_norm, o.w_gate, o.w_up, o.w_down,
                              o.bridge_norm, o.bridge_proj, o.bridge_gate, o.fuse_mamba, o.fuse_attn, o.exchange,
                              o.router_w, o.router_feat, o.router_b, o.ssm_norm, o.dt_norm, o.b_norm, o.c_norm,
                              o.moe_router, o.moe_bias, o.e_gate, o.e_up, o.e_down, o.s_gate, o.s_up, o.s_down,
                              o.in_proj_b, o.out_proj_b})
      if (off != kNoTensor) b = std::min(b, off);
    return b;
  }
  // The gradients of [begin, end) are final for this call (set_grads_done).
  void report(int64_t begin, int64_t end) {
    if (grads_done) grads_done(begin, end);
  }

  const ModelConfig& c() const { return lo.c; }
  // Weights in the compute type; A_log stays float32 (the scan forms A = -exp(A_log) in float).
  Tensor w(int64_t off, int rows, int cols) const {
    HM_ASSERT(off != kNoTensor);
    return {const_cast<char*>(W) + off * int64_t(dtype_size(ct)), ct, rows, cols};
  }
  Tensor w32(int64_t off, int rows, int cols) const {
    HM_ASSERT(off != kNoTensor);
    return {const_cast<float*>(master) + off, DType::F32, rows, cols};
  }
  Tensor g(int64_t off, int rows, int cols) const {
    HM_ASSERT(off != kNoTensor);
    return {G + off, DType::F32, rows, cols};
  }
  Tensor a(Buffer& b, int cols) { return act(be, b, ct, n, cols); }

  // Layer i's activations laid out from base (nullptr: sizes only).
  LayerActs carve(int i, char* base, size_t* bytes) const {
    const ModelConfig& mc = c();
    const int D = mc.d_model;
    Carver cv(base);
    LayerActs s;
    s.u = cv.take(ct, n, D);
    if (mc.has_attention_path(i)) {
      const int H = mc.n_heads, Q = H * mc.head_dim(), KV = mc.n_kv_heads * mc.head_dim();
      s.q = cv.take(ct, n, Q);
      s.k = cv.take(ct, n, KV);
      s.v = cv.take(ct, n, KV);
      s.inner = cv.take(ct, n, Q);
      s.lse = cv.take(DType::F32, n, H);
    }
    if (mc.is_mamba2(i)) {
      const int E = mc.d_inner();
      s.zxd = cv.take(ct, n, mc.mamba2_in_proj_rows());
      s.xbc = cv.take(ct, n, mc.mamba2_conv_dim());
      s.ys = cv.take(ct, n, E);
      s.yn = cv.take(ct, n, E);
      if (mc.mamba2_gated_norm && mc.mamba2_norm_before_gate) s.ynorm = cv.take(ct, n, E);
    } else if (mc.has_mamba_path(i)) {
      const int E = mc.d_inner(), N = mc.d_state, P = mc.resolved_dt_rank() + 2 * N;
      s.x = cv.take(ct, n, E);
      s.z = cv.take(ct, n, E);
      s.xc = cv.take(ct, n, E);
      s.dt = cv.take(ct, n, E);
      s.yg = cv.take(ct, n, E);
      s.dbc = cv.take(ct, n, P);
      if (mc.mamba_bcdt_norm) {
        s.rbc = cv.take(ct, n, P);
        s.nbc = cv.take(ct, n, P);
      }
      // A true layer's Mamba path runs fewer tokens in at most as many sequences: rg's bound holds.
      s.scan = cv.bytes(be.scan_saved_bytes(rg, E, N, chunk));
    }
    if (mc.is_true(i)) {  // the paths' inputs and outputs, compacted (docs/TRUE_HYBRID.md)
      s.um = cv.take(ct, n, D);
      s.ym = cv.take(ct, n, D);
      s.va = cv.take(ct, n, D);
      s.ya = cv.take(ct, n, D);
    }
    if (mc.has_ffn(i)) {
      s.h2 = cv.take(ct, n, D);
      s.m = cv.take(ct, n, D);
      if (mc.is_moe(i)) {
        const int K = n * mc.moe_top_k, Fe = mc.moe_width(), S = mc.moe_shared_ff;
        s.lg = cv.take(DType::F32, n, mc.moe_experts);
        s.xe = cv.take(ct, K, D);
        s.ge = cv.take(ct, K, Fe);
        s.ue = cv.take(ct, K, Fe);
        s.ae = cv.take(ct, K, Fe);
        s.ye = cv.take(ct, K, D);
        if (S > 0) {
          s.sg = cv.take(ct, n, S);
          s.sup = cv.take(ct, n, S);
          s.sa = cv.take(ct, n, S);
        }
      } else {
        s.g = cv.take(ct, n, mc.d_ff);
        s.up = cv.take(ct, n, mc.d_ff);
        s.a = cv.take(ct, n, mc.d_ff);
      }
    }
    if (!ckpt && mc.has_bridge(i)) s.bn = cv.take(ct, n, mc.inner_dim(i - 1));
    if (bytes) *bytes = cv.size();
    return s;
  }
  // Layer i's activations (with ckpt: valid while the slot holds layer i).
  LayerActs acts(int i) { return carve(i, static_cast<char*>(arenas[ckpt ? 0 : size_t(i)].data()), nullptr); }
  // Layer i's bridge input rmsnorm(inner(i - 1)): saved by the forward, or with ckpt recomputed.
  Tensor bridge_norm(int i) {
    return ckpt ? act(be, bnb, ct, n, c().inner_dim(i - 1)) : acts(i).bn;
  }

  void begin(const int32_t* tokens, const int32_t* targets, int B, int L) {
    HM_CHECK(master != nullptr, "BatchGrad: set_weights was not called");
    const ModelConfig& mc = c();
    n = B * L;
    rg.clear();
    for (int b = 0; b < B; ++b) rg.add(b, L, 0);
    rg.upload(be);
    ids.reserve(be, sizeof(int32_t) * size_t(n));
    tgts.reserve(be, sizeof(int32_t) * size_t(n));
    be.to_device(ids.data(), tokens, sizeof(int32_t) * size_t(n));
    be.to_device(tgts.data(), targets, sizeof(int32_t) * size_t(n));
    // Every buffer grown here, before the forward: the slot must not be reallocated while it
    // holds a layer whose inner output the next bridge reads.
    hin.resize(size_t(mc.n_layers));
    arenas.resize(ckpt ? 1 : size_t(mc.n_layers));
    tstate.resize(size_t(mc.n_layers));
    mstate.resize(size_t(mc.n_layers));
    for (int i = 0; i < mc.n_layers; ++i) {
      if (mc.is_true(i) && !tstate[size_t(i)]) tstate[size_t(i)] = std::make_unique<TrueState>();
      if (mc.has_ffn(i) && mc.is_moe(i) && !mstate[size_t(i)]) mstate[size_t(i)] = std::make_unique<MoeState>();
    }
    seq_count.assign(size_t(B), 0);
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < L; ++t) seq_count[size_t(b)] += targets[int64_t(b) * L + t] >= 0;
    size_t slot = 1, S = 0;
    for (int i = 0; i < mc.n_layers; ++i) {
      hin[size_t(i)].reserve(be, size_t(n) * size_t(mc.d_model) * dtype_size(ct));
      size_t bytes = 0;
      carve(i, nullptr, &bytes);
      if (ckpt)
        slot = std::max(slot, bytes);
      else
        arenas[size_t(i)].reserve(be, std::max<size_t>(1, bytes));
      if (mc.has_bridge(i)) S = std::max(S, size_t(mc.inner_dim(i - 1)));
    }
    if (ckpt) {
      arenas[0].reserve(be, slot);
      if (S > 0) bnb.reserve(be, size_t(n) * S * dtype_size(ct));
    }
  }

  // ---- the layers: forward and backward side by side ----

  // A row of `cols` copies of v in the compute type (a scale vector for add_rows), kept.
  Tensor const_row(float v, int cols) {
    Buffer& b = consts[v];
    if (b.bytes() < size_t(cols) * dtype_size(ct)) {
      be.synchronize();  // ops already enqueued may still read the smaller row being replaced
      b.reserve(be, size_t(cols) * dtype_size(ct));
      const std::vector<float> host(size_t(cols), v);
      Buffer f32;
      f32.reserve(be, host.size() * sizeof(float));
      be.to_device(f32.data(), host.data(), host.size() * sizeof(float));
      be.convert(Tensor(b.data(), ct, 1, cols), Tensor(f32.data(), DType::F32, 1, cols));
      be.synchronize();  // f32 is freed on return
    }
    return Tensor(b.data(), ct, 1, cols);
  }
  // dst = v * src, elementwise (dst and src distinct, same shape).
  void scale_into(Tensor dst, Tensor src, float v) {
    be.memzero(dst.data, size_t(dst.rows) * size_t(dst.cols) * dtype_size(ct));
    be.add_rows(dst, nullptr, src, nullptr, dst.rows, nullptr, const_row(v, dst.cols));
  }
  // Granite's multipliers: each mixer's and FFN's output joins the stream times residual_multiplier.
  Tensor resid_scale() { return c().residual_multiplier != 1.0f ? const_row(c().residual_multiplier, c().d_model) : Tensor(); }
  // The gradient reaching a block's output from dH: dH itself, or times residual_multiplier.
  Tensor block_grad(Tensor dH) {
    if (c().residual_multiplier == 1.0f) return dH;
    const Tensor d = a(dres, c().d_model);
    scale_into(d, dH, c().residual_multiplier);
    return d;
  }
  // q's scale when attention_scale replaces 1/sqrt(head_dim) (the attention op divides by it).
  float q_scale() const {
    return c().attention_scale != 0.0f ? float(double(c().attention_scale) * std::sqrt(double(c().head_dim()))) : 1.0f;
  }

  // mamba_bcdt_norm: dt_r [rows, R], B and C [rows, N] as contiguous blocks of buf (the norm
  // ops take whole rows), for the first `rows` tokens.
  std::array<Tensor, 3> bcdt_blocks(Tensor buf, int rows) const {
    const int R = c().resolved_dt_rank(), N = c().d_state;
    char* base = static_cast<char*>(buf.data);
    const size_t es = dtype_size(ct);
    return {Tensor(base, ct, rows, R), Tensor(base + size_t(rows) * R * es, ct, rows, N),
            Tensor(base + size_t(rows) * (R + N) * es, ct, rows, N)};
  }
  // The weights of the dt, B and C norms (Jamba's learned ones, or ones) and where their
  // gradients go (a scratch row for the weightless ones).
  std::array<std::pair<Tensor, Tensor>, 3> bcdt_weights(const LayerOffsets& o) {
    const ModelConfig& mc = c();
    const int R = mc.resolved_dt_rank(), N = mc.d_state;
    if (mc.mamba_bcdt_norm_weight) {
      // No gradient arena in loss_sum: the forward reads only the weights.
      auto gr = [&](int64_t off, int cols) { return G ? g(off, 1, cols) : Tensor(); };
      return {std::pair{w(o.dt_norm, 1, R), gr(o.dt_norm, R)}, std::pair{w(o.b_norm, 1, N), gr(o.b_norm, N)},
              std::pair{w(o.c_norm, 1, N), gr(o.c_norm, N)}};
    }
    const int M = std::max(R, N);
    dw_ones.reserve(be, size_t(M) * sizeof(float));
    const Tensor one = const_row(1.0f, M), dw(dw_ones.data(), DType::F32, 1, M);
    return {std::pair{one.cols_view(0, R), dw.cols_view(0, R)}, std::pair{one.cols_view(0, N), dw.cols_view(0, N)},
            std::pair{one.cols_view(0, N), dw.cols_view(0, N)}};
  }

  // RoPE (or its transpose, on a gradient) on x [rows, heads * head_dim], contiguous: the whole
  // head, or only its first rope_dim channels (Bamba's partial rotary), gathered into scratch,
  // rotated there and put back, as inference's rope_heads does.
  void rope(Tensor x, int heads, const Ragged& r, bool transpose) {
    const ModelConfig& mc = c();
    const int hd = mc.head_dim(), rd = mc.resolved_rope_dim();
    auto run = [&](Tensor t, int dim) {
      if (transpose) be.rope_backward(t, heads, dim, mc.rope_theta, r);
      else be.rope(t, heads, dim, mc.rope_theta, r);
    };
    if (rd == hd) return run(x, hd);
    HM_ASSERT(x.ld == int64_t(heads) * hd);
    const int rows = x.rows * heads;
    const Tensor per_head = Tensor(x.data, ct, rows, hd).cols_view(0, rd);  // one row per (token, head)
    const Tensor part = act(be, rope_tmp, ct, rows, rd);                   // = [n, heads * rd]
    be.copy_rows(part, nullptr, per_head, nullptr, rows);
    run(Tensor(part.data, ct, x.rows, heads * rd), rd);
    be.copy_rows(per_head, nullptr, part, nullptr, rows);
  }

  // out [rows, D] = the Mamba mixer of u over the sequences of r (rows = r.n_tokens(): every
  // token, or a true layer's Mamba tokens); ref::grad::mamba_block_forward's math.
  void mamba_forward(const LayerActs& s0, Tensor out, Tensor u, const LayerOffsets& o, const Ragged& r) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, E = mc.d_inner(), N = mc.d_state, R = mc.resolved_dt_rank(), P = R + 2 * N;
    const LayerActs s = first_rows(s0, r.n_tokens());
    const Tensor in_proj = w(o.in_proj, 2 * E, D);
    be.linear(s.x, u, in_proj.rows_view(0, E), false);  // x, z = in_proj(u).chunk(2, dim=-1)
    be.linear(s.z, u, in_proj.rows_view(E, E), false);
    if (mc.mamba_proj_bias) {  // + in_proj's bias: a linear of a ones column, as its backward sums
      add_bias(s.x, o.in_proj_b, E);
      add_bias(s.z, o.in_proj_b + E, E);
    }
    be.conv1d_silu_train(s.xc, s.x, w(o.conv_w, E, mc.d_conv), w(o.conv_b, 1, E), r);
    be.linear(s.dbc, s.xc, w(o.x_proj, P, E), false);  // dt_r, B, C = x_proj(xc).split([R, N, N])
    Tensor dtr = s.dbc.cols_view(0, R), B = s.dbc.cols_view(R, N), C = s.dbc.cols_view(R + N, N);
    if (mc.mamba_bcdt_norm) {  // each RMS-normalized (Falcon-Mamba, Jamba), as HybridModel::mamba_path
      const auto raw = bcdt_blocks(s.rbc, r.n_tokens()), nrm = bcdt_blocks(s.nbc, r.n_tokens());
      const auto wts = bcdt_weights(o);
      const Tensor src[3] = {dtr, B, C};
      for (int k = 0; k < 3; ++k) {
        be.copy_rows(raw[size_t(k)], nullptr, src[k], nullptr, r.n_tokens());
        be.rmsnorm(nrm[size_t(k)], raw[size_t(k)], wts[size_t(k)].first, mc.mamba_bcdt_norm_eps);
      }
      dtr = nrm[0], B = nrm[1], C = nrm[2];
    }
    be.linear(s.dt, dtr, w(o.dt_w, E, R), false);
    be.selective_scan_train(s.yg, s.scan, s.xc, s.dt, w(o.dt_b, 1, E), w32(o.A_log, E, N), B, C,
                            w(o.Dskip, 1, E), s.z, chunk, r);
    be.linear(out, s.yg, w(o.out_proj, D, E), false);
    if (mc.mamba_proj_bias) add_bias(out, o.out_proj_b, D);
  }
  // y [rows, cols] += b (cols floats at off) on every row, as y += ones[rows, 1] b^T; its
  // gradient db += dy^T ones (bias_backward).
  void add_bias(Tensor y, int64_t off, int cols) {
    be.linear(y, ones_col(y.rows), w(off, cols, 1), true);
  }
  void bias_backward(Tensor dY, int64_t off, int cols) {
    be.linear_backward(Tensor(), g(off, cols, 1), dY, ones_col(dY.rows), w(off, cols, 1), false);
  }
  Tensor ones_col(int rows) { return Tensor(const_row(1.0f, n).data, ct, rows, 1); }
  // du assigned; dinner (may be empty): the gradient reaching yg from the next layer's bridge.
  void mamba_backward(Tensor du, Tensor dout, Tensor dinner, Tensor u, const LayerActs& s0, const LayerOffsets& o,
                      const Ragged& r) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, E = mc.d_inner(), N = mc.d_state, K = mc.d_conv, R = mc.resolved_dt_rank(),
              P = R + 2 * N, rows = r.n_tokens();
    const LayerActs s = first_rows(s0, rows);
    const Tensor dYg = a(dyg, E).rows_view(0, rows), dXc = a(dxc, E).rows_view(0, rows),
                 dDt = a(ddt, E).rows_view(0, rows), dZ = a(dz, E).rows_view(0, rows),
                 gdbc = a(ddbc, P).rows_view(0, rows);
    if (!dinner.empty()) be.copy(dYg.data, dinner.data, size_t(rows) * size_t(E) * dtype_size(ct));
    be.linear_backward(dYg, g(o.out_proj, D, E), dout, s.yg, w(o.out_proj, D, E), !dinner.empty());
    if (mc.mamba_proj_bias) bias_backward(dout, o.out_proj_b, D);
    // The scan's and dt_proj's inputs, and where their gradients go: dbc's columns, or with the
    // dt/B/C norms the normed blocks, whose gradients the norms' backward carries into dbc.
    Tensor dtr = s.dbc.cols_view(0, R), B = s.dbc.cols_view(R, N), C = s.dbc.cols_view(R + N, N);
    Tensor gdtr = gdbc.cols_view(0, R), gB = gdbc.cols_view(R, N), gC = gdbc.cols_view(R + N, N);
    if (mc.mamba_bcdt_norm) {
      const auto nrm = bcdt_blocks(s.nbc, rows), gn = bcdt_blocks(a(dnbc, P), rows);
      dtr = nrm[0], B = nrm[1], C = nrm[2];
      gdtr = gn[0], gB = gn[1], gC = gn[2];
    }
    be.selective_scan_backward(dXc, dDt, gB, gC, dZ, g(o.dt_b, 1, E), g(o.A_log, E, N), g(o.Dskip, 1, E), dYg,
                               s.scan, s.xc, s.dt, w(o.dt_b, 1, E), w32(o.A_log, E, N), B, C, w(o.Dskip, 1, E),
                               s.z, chunk, r);
    be.linear_backward(gdtr, g(o.dt_w, E, R), dDt, dtr, w(o.dt_w, E, R), false);
    if (mc.mamba_bcdt_norm) {
      const auto raw = bcdt_blocks(s.rbc, rows), gn = bcdt_blocks(a(dnbc, P), rows),
                 gr = bcdt_blocks(a(drbc, P), rows);
      const auto wts = bcdt_weights(o);
      const Tensor dst[3] = {gdbc.cols_view(0, R), gdbc.cols_view(R, N), gdbc.cols_view(R + N, N)};
      for (int k = 0; k < 3; ++k) {
        be.rmsnorm_backward(gr[size_t(k)], wts[size_t(k)].second, gn[size_t(k)], raw[size_t(k)],
                            wts[size_t(k)].first, mc.mamba_bcdt_norm_eps, false);
        be.copy_rows(dst[k], nullptr, gr[size_t(k)], nullptr, rows);
      }
    }
    // xc feeds both x_proj and the scan: x_proj's gradient adds into dxc
    be.linear_backward(dXc, g(o.x_proj, P, E), gdbc, s.xc, w(o.x_proj, P, E), true);
    const Tensor dx = dYg;  // dyg is dead once the scan's backward is done
    be.conv1d_silu_backward(dx, g(o.conv_w, E, K), g(o.conv_b, 1, E), dXc, s.x, w(o.conv_w, E, K),
                            w(o.conv_b, 1, E), r);
    const Tensor in_proj = w(o.in_proj, 2 * E, D), gin = g(o.in_proj, 2 * E, D);
    be.linear_backward(du, gin.rows_view(0, E), dx, u, in_proj.rows_view(0, E), false);
    be.linear_backward(du, gin.rows_view(E, E), dZ, u, in_proj.rows_view(E, E), true);
    if (mc.mamba_proj_bias) {
      bias_backward(dx, o.in_proj_b, E);
      bias_backward(dZ, o.in_proj_b + E, E);
    }
  }
  // out [rows, D] = the Mamba-2 mixer of u over the sequences of r (HybridModel::mamba2_path's
  // math): the gate is the gated RMSNorm rmsnorm(y * silu(z)) * w, or (Falcon-H1) y * silu(z)
  // without a norm, or rmsnorm(y) * w * silu(z) with the norm before the gate, per group.
  void mamba2_forward(const LayerActs& s0, Tensor out, Tensor u, const LayerOffsets& o, const Ragged& r) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, E = mc.d_inner(), N = mc.d_state, Gr = mc.mamba2_groups, H = mc.mamba2_heads(),
              CD = mc.mamba2_conv_dim(), IN = mc.mamba2_in_proj_rows(), rows = r.n_tokens();
    const LayerActs s = first_rows(s0, rows);
    be.linear(s.zxd, u, w(o.in_proj, IN, D), false);  // z | xBC | dt = in_proj(u)
    be.conv1d_silu_train(s.xbc, s.zxd.cols_view(E, CD), w(o.conv_w, CD, mc.d_conv), w(o.conv_b, 1, CD), r);
    be.ssd_scan_train(s.ys, s.xbc.cols_view(0, E), s.zxd.cols_view(E + CD, H), w(o.dt_b, 1, H), w32(o.A_log, 1, H),
                      s.xbc.cols_view(E, Gr * N), s.xbc.cols_view(E + Gr * N, Gr * N), w(o.Dskip, 1, H), H, Gr,
                      mc.mamba2_dt_min, mc.mamba2_dt_max, r);
    if (mc.mamba2_gated_norm && !mc.mamba2_norm_before_gate) {
      be.gated_rmsnorm(s.yn, s.ys, s.zxd.cols_view(0, E), w(o.ssm_norm, 1, E), mc.mamba2_norm_group(),
                       float(mc.norm_eps));
    } else {  // through swiglu (silu(z) * v) on a contiguous copy of z
      const Tensor z = act(be, zc, ct, rows, E);
      be.copy_rows(z, nullptr, s.zxd.cols_view(0, E), nullptr, rows);
      Tensor v = s.ys;
      if (mc.mamba2_gated_norm) {  // v = rmsnorm(y) * w per group: one row per (token, group)
        v = s.ynorm;
        norm_groups(v, s.ys, w(o.ssm_norm, 1, E), rows);
      }
      be.swiglu(s.yn, z, v);
    }
    be.linear(out, s.yn, w(o.out_proj, D, E), false);
  }
  // v = rmsnorm(y) * w over groups of mamba2_norm_group() columns: with w itself when one group
  // spans the row, else with a unit weight, w applied per column after.
  void norm_groups(Tensor v, Tensor y, Tensor wt, int rows) {
    const ModelConfig& mc = c();
    const int E = mc.d_inner(), gw = mc.mamba2_norm_group(), groups = E / gw;
    if (groups == 1) return be.rmsnorm(v, y, wt, float(mc.norm_eps));
    be.rmsnorm(Tensor(v.data, ct, rows * groups, gw), Tensor(y.data, ct, rows * groups, gw), const_row(1.0f, gw),
               float(mc.norm_eps));
    const Tensor un = act(be, dnorm, ct, rows, E);  // scratch: the unit-weight norm
    be.copy(un.data, v.data, size_t(rows) * E * dtype_size(ct));
    scale_cols(v, un, wt);
  }
  // dst = src * w per column.
  void scale_cols(Tensor dst, Tensor src, Tensor wt) {
    be.memzero(dst.data, size_t(dst.rows) * dst.cols * dtype_size(ct));
    be.add_rows(dst, nullptr, src, nullptr, dst.rows, nullptr, wt);
  }
  // du assigned; dinner (may be empty): the gradient reaching yn from the next layer's bridge.
  void mamba2_backward(Tensor du, Tensor dout, Tensor dinner, Tensor u, const LayerActs& s0, const LayerOffsets& o,
                       const Ragged& r) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, E = mc.d_inner(), N = mc.d_state, Gr = mc.mamba2_groups, H = mc.mamba2_heads(),
              CD = mc.mamba2_conv_dim(), IN = mc.mamba2_in_proj_rows(), K = mc.d_conv, rows = r.n_tokens();
    const LayerActs s = first_rows(s0, rows);
    const Tensor dYn = a(dyg, E).rows_view(0, rows), dYs = a(dz, E).rows_view(0, rows),
                 dZXD = a(dzxd, IN).rows_view(0, rows), dXBC = a(dxbc, CD).rows_view(0, rows);
    if (!dinner.empty()) be.copy(dYn.data, dinner.data, size_t(rows) * size_t(E) * dtype_size(ct));
    be.linear_backward(dYn, g(o.out_proj, D, E), dout, s.yn, w(o.out_proj, D, E), !dinner.empty());
    if (mc.mamba2_gated_norm && !mc.mamba2_norm_before_gate) {
      be.gated_rmsnorm_backward(dYs, dZXD.cols_view(0, E), g(o.ssm_norm, 1, E), dYn, s.ys, s.zxd.cols_view(0, E),
                                w(o.ssm_norm, 1, E), mc.mamba2_norm_group(), float(mc.norm_eps));
    } else {
      const Tensor z = act(be, zc, ct, rows, E), dZ = act(be, dzc, ct, rows, E);
      be.copy_rows(z, nullptr, s.zxd.cols_view(0, E), nullptr, rows);
      if (!mc.mamba2_gated_norm) {
        be.swiglu_backward(dZ, dYs, dYn, z, s.ys);
      } else {  // yn = silu(z) * v, v = norm_groups(ys)
        const Tensor dV = a(dvn, E).rows_view(0, rows);
        be.swiglu_backward(dZ, dV, dYn, z, s.ynorm);
        norm_groups_backward(dYs, dV, s.ys, o, rows);
      }
      be.copy_rows(dZXD.cols_view(0, E), nullptr, dZ, nullptr, rows);
    }
    be.ssd_scan_backward(dXBC.cols_view(0, E), dZXD.cols_view(E + CD, H), dXBC.cols_view(E, Gr * N),
                         dXBC.cols_view(E + Gr * N, Gr * N), g(o.dt_b, 1, H), g(o.A_log, 1, H), g(o.Dskip, 1, H), dYs,
                         s.xbc.cols_view(0, E), s.zxd.cols_view(E + CD, H), w(o.dt_b, 1, H), w32(o.A_log, 1, H),
                         s.xbc.cols_view(E, Gr * N), s.xbc.cols_view(E + Gr * N, Gr * N), w(o.Dskip, 1, H), H, Gr,
                         mc.mamba2_dt_min, mc.mamba2_dt_max, r);
    be.conv1d_silu_backward(dZXD.cols_view(E, CD), g(o.conv_w, CD, K), g(o.conv_b, 1, CD), dXBC,
                            s.zxd.cols_view(E, CD), w(o.conv_w, CD, K), w(o.conv_b, 1, CD), r);
    be.linear_backward(du, g(o.in_proj, IN, D), dZXD, u, w(o.in_proj, IN, D), false);
  }
  // norm_groups' backward: dy assigned from dv, the norm weight's gradient accumulated.
  void norm_groups_backward(Tensor dY, Tensor dV, Tensor y, const LayerOffsets& o, int rows) {
    const ModelConfig& mc = c();
    const int E = mc.d_inner(), gw = mc.mamba2_norm_group(), groups = E / gw;
    const float eps = float(mc.norm_eps);
    if (groups == 1)
      return be.rmsnorm_backward(dY, g(o.ssm_norm, 1, E), dV, y, w(o.ssm_norm, 1, E), eps, false);
    // v = w * un, un = rmsnorm(y) per group with a unit weight (recomputed).
    const Tensor un = act(be, dnorm, ct, rows, E), dUn = act(be, dun, ct, rows, E);
    be.rmsnorm(Tensor(un.data, ct, rows * groups, gw), Tensor(y.data, ct, rows * groups, gw), const_row(1.0f, gw), eps);
    be.scale_cols_backward(dUn, g(o.ssm_norm, 1, E), dV, un, w(o.ssm_norm, 1, E));
    dw_ones.reserve(be, size_t(gw) * sizeof(float));
    be.rmsnorm_backward(Tensor(dY.data, ct, rows * groups, gw), Tensor(dw_ones.data(), DType::F32, 1, gw),
                        Tensor(dUn.data, ct, rows * groups, gw), Tensor(y.data, ct, rows * groups, gw),
                        const_row(1.0f, gw), eps, false);
  }
  void attention_forward(const LayerActs& s0, Tensor out, Tensor u, const LayerOffsets& o, const Ragged& r) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, H = mc.n_heads, Gk = mc.n_kv_heads, hd = mc.head_dim(), Q = H * hd, KV = Gk * hd;
    const LayerActs s = first_rows(s0, r.n_tokens());
    if (q_scale() == 1.0f) {
      be.linear(s.q, u, w(o.wq, Q, D), false);
    } else {  // q = attention_scale * sqrt(hd) * (u wq^T), through inner (free until attention writes it)
      be.linear(s.inner, u, w(o.wq, Q, D), false);
      scale_into(s.q, s.inner, q_scale());
    }
    be.linear(s.k, u, w(o.wk, KV, D), false);
    be.linear(s.v, u, w(o.wv, KV, D), false);
    if (mc.rope) {
      rope(s.q, H, r, false);
      rope(s.k, Gk, r, false);
    }
    be.attention_train(s.inner, s.lse, s.q, s.k, s.v, H, Gk, hd, r);
    be.linear(out, s.inner, w(o.wo, D, Q), false);
  }
  void attention_backward(Tensor du, Tensor dout, Tensor dinner, Tensor u, const LayerActs& s0,
                          const LayerOffsets& o, const Ragged& r) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, H = mc.n_heads, Gk = mc.n_kv_heads, hd = mc.head_dim(), Q = H * hd, KV = Gk * hd,
              rows = r.n_tokens();
    const LayerActs s = first_rows(s0, rows);
    const Tensor dI = a(dinn, Q).rows_view(0, rows), dQ = a(dq, Q).rows_view(0, rows),
                 dK = a(dk, KV).rows_view(0, rows), dV = a(dv, KV).rows_view(0, rows);
    if (!dinner.empty()) be.copy(dI.data, dinner.data, size_t(rows) * size_t(Q) * dtype_size(ct));
    be.linear_backward(dI, g(o.wo, D, Q), dout, s.inner, w(o.wo, D, Q), !dinner.empty());
    be.attention_backward(dQ, dK, dV, dI, s.q, s.k, s.v, s.inner, s.lse, H, Gk, hd, r);
    if (mc.rope) {  // gradients with respect to q, k before the rotation
      rope(dQ, H, r, true);
      rope(dK, Gk, r, true);
    }
    Tensor dQl = dQ;  // with respect to u wq^T
    if (q_scale() != 1.0f) {
      dQl = dI;  // dead once attention's backward has run
      scale_into(dQl, dQ, q_scale());
    }
    be.linear_backward(du, g(o.wq, Q, D), dQl, u, w(o.wq, Q, D), false);
    be.linear_backward(du, g(o.wk, KV, D), dK, u, w(o.wk, KV, D), true);
    be.linear_backward(du, g(o.wv, KV, D), dV, u, w(o.wv, KV, D), true);
  }

  // out = down(silu(gate(m)) * up(m))
  // out (=|+=) down(silu(x gate^T) * (x up^T)), or with squared-ReLU MLPs (mlp_act relu2: no gate,
  // gt and Wg empty) down(relu2(x up^T)); keeps gate, up and the activation for the backward.
  void ffn_forward(Tensor x, Tensor gt, Tensor up_, Tensor act_, Tensor out, Tensor Wg, Tensor Wu, Tensor Wd,
                   bool accumulate) {
    be.linear(up_, x, Wu, false);
    if (Wg.empty()) {
      be.relu2(act_, up_);
    } else {
      be.linear(gt, x, Wg, false);
      be.swiglu(act_, gt, up_);
    }
    be.linear(out, act_, Wd, accumulate);
  }
  // Its backward: dx (=|+=), the weights' gradients accumulated (Gg, Gu, Gd).
  void ffn_backward(Tensor dx, bool accumulate, Tensor dout, Tensor x, Tensor gt, Tensor up_, Tensor act_, Tensor Wg,
                    Tensor Wu, Tensor Wd, Tensor Gg, Tensor Gu, Tensor Gd) {
    const int rows = x.rows, F = up_.cols;
    const Tensor dA = a(da, F).rows_view(0, rows), dU = a(dup, F).rows_view(0, rows);
    be.linear_backward(dA, Gd, dout, act_, Wd, false);
    if (Wg.empty()) {
      be.relu2_backward(dU, dA, up_);
      be.linear_backward(dx, Gu, dU, x, Wu, accumulate);
      return;
    }
    const Tensor dG = a(dg, F).rows_view(0, rows);
    be.swiglu_backward(dG, dU, dA, gt, up_);
    be.linear_backward(dx, Gg, dG, x, Wg, accumulate);
    be.linear_backward(dx, Gu, dU, x, Wu, true);
  }
  // A gate projection's weight or gradient, or nothing for squared-ReLU MLPs.
  Tensor wg(int64_t off, int rows, int cols) const { return off == kNoTensor ? Tensor() : w(off, rows, cols); }
  Tensor gg(int64_t off, int rows, int cols) const { return off == kNoTensor ? Tensor() : g(off, rows, cols); }
  void mlp_forward(const LayerActs& s, Tensor out, const LayerOffsets& o) {
    const int D = c().d_model, F = c().d_ff;
    ffn_forward(s.m, s.g, s.up, s.a, out, wg(o.w_gate, F, D), w(o.w_up, F, D), w(o.w_down, D, F), false);
  }
  void mlp_backward(Tensor dm, Tensor dout, const LayerActs& s, const LayerOffsets& o) {
    const int D = c().d_model, F = c().d_ff;
    ffn_backward(dm, false, dout, s.m, s.g, s.up, s.a, wg(o.w_gate, F, D), w(o.w_up, F, D), w(o.w_down, D, F),
                 gg(o.w_gate, F, D), g(o.w_up, F, D), g(o.w_down, D, F));
  }

  // Expert e's gate, up and down matrices (slices of the stacks), as weights or as gradients.
  std::array<Tensor, 3> expert(const LayerOffsets& o, int e, bool grad) const {
    const int D = c().d_model, Fe = c().moe_width();
    const int64_t fd = int64_t(Fe) * D;
    auto t = [&](int64_t off, int r, int cols) { return grad ? g(off, r, cols) : w(off, r, cols); };
    const Tensor gate = o.e_gate == kNoTensor ? Tensor() : t(o.e_gate + e * fd, Fe, D);  // none with relu2
    return {gate, t(o.e_up + e * fd, Fe, D), t(o.e_down + e * fd, D, Fe)};
  }

  // out [n, D] = the MoE of s.m (HybridModel::moe's math): the router's logits read back, the
  // routing decided on the host (moe_route), each expert run once over its rows gathered, its
  // output added back scaled by the rows' gates, and the shared expert over every row.
  void moe_forward(int i, const LayerActs& s, Tensor out, const LayerOffsets& o) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, X = mc.moe_experts, k = mc.moe_top_k, S = mc.moe_shared_ff;
    MoeState& M = *mstate[size_t(i)];
    be.linear(s.lg, s.m, w(o.moe_router, X, D), false);
    std::vector<float> lg(size_t(n) * X);
    be.to_host(lg.data(), s.lg.data, sizeof(float) * lg.size());
    const std::vector<float> corr = mc.moe_router == "sigmoid" ? param(o.moe_bias, X) : std::vector<float>();
    std::vector<int32_t> forced;
    if (freeze) {
      HM_CHECK(M.rt.T == n, "BatchGrad: freeze_routing holds the routing of a batch of ", M.rt.T, " tokens, not ", n);
      forced = M.rt.chosen;
    }
    moe_route(mc, lg.data(), corr.empty() ? nullptr : corr.data(), n, M.rt, forced.empty() ? nullptr : forced.data());
    M.idx.clear(), M.gates.clear();
    M.begin.assign(size_t(X) + 1, 0);
    for (int e = 0; e < X; ++e) {
      M.begin[size_t(e)] = int(M.idx.size());
      M.idx.insert(M.idx.end(), M.rt.rows[size_t(e)].begin(), M.rt.rows[size_t(e)].end());
      M.gates.insert(M.gates.end(), M.rt.gates[size_t(e)].begin(), M.rt.gates[size_t(e)].end());
    }
    M.begin[size_t(X)] = int(M.idx.size());
    std::vector<int> cursor(M.begin.begin(), M.begin.end() - 1);  // rows[e] is in token order
    M.slot.resize(size_t(n) * k);
    for (int t = 0; t < n; ++t)
      for (int j = 0; j < k; ++j) M.slot[size_t(t) * k + j] = cursor[size_t(M.rt.chosen[size_t(t) * k + j])]++;
    M.d_idx.reserve(be, sizeof(int32_t) * M.idx.size());
    M.d_gates.reserve(be, sizeof(float) * M.gates.size());
    be.to_device(M.d_idx.data(), M.idx.data(), sizeof(int32_t) * M.idx.size());
    be.to_device(M.d_gates.data(), M.gates.data(), sizeof(float) * M.gates.size());
    if (S > 0)
      ffn_forward(s.m, s.sg, s.sup, s.sa, out, wg(o.s_gate, S, D), w(o.s_up, S, D), w(o.s_down, D, S), false);
    else
      be.memzero(out.data, size_t(n) * D * dtype_size(ct));
    for (int e = 0; e < X; ++e) {
      const int b = M.begin[size_t(e)], ne = M.begin[size_t(e) + 1] - b;
      if (ne == 0) continue;  // an expert no token chose is not computed
      const int32_t* idx = static_cast<const int32_t*>(M.d_idx.data()) + b;
      const Tensor xe = s.xe.rows_view(b, ne), ye = s.ye.rows_view(b, ne);
      const auto We = expert(o, e, false);
      be.copy_rows(xe, nullptr, s.m, idx, ne);
      ffn_forward(xe, s.ge.rows_view(b, ne), s.ue.rows_view(b, ne), s.ae.rows_view(b, ne), ye, We[0], We[1], We[2],
                  false);
      be.add_rows(out, idx, ye, nullptr, ne, static_cast<const float*>(M.d_gates.data()) + b, Tensor());
    }
  }
  // dm (assigned) from dout: the shared expert's and every expert's backward, and the router's:
  // each gate's gradient dout . y_e on the device (n k floats come back, not the rows), carried
  // to the logits by moe_route_backward on the host.
  void moe_backward(int i, Tensor dm, Tensor dout, const LayerActs& s, const LayerOffsets& o) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, X = mc.moe_experts, k = mc.moe_top_k, S = mc.moe_shared_ff;
    const MoeState& M = *mstate[size_t(i)];
    const int rows = int(M.idx.size());
    const Tensor dots = act(be, row_dot_out, DType::F32, 1, rows);  // per row of idx: dout[token] . y_e
    be.row_dots(dots, dout, static_cast<const int32_t*>(M.d_idx.data()), s.ye.rows_view(0, rows));
    std::vector<float> dots_h(static_cast<size_t>(rows));
    be.to_host(dots_h.data(), dots.data, sizeof(float) * dots_h.size());
    std::vector<double> dgate(size_t(n) * k), dl(size_t(n) * X);
    for (size_t q = 0; q < dgate.size(); ++q) dgate[q] = dots_h[size_t(M.slot[q])];
    moe_route_backward(mc, M.rt, dgate.data(), dl.data());
    if (S > 0)
      ffn_backward(dm, false, dout, s.m, s.sg, s.sup, s.sa, wg(o.s_gate, S, D), w(o.s_up, S, D), w(o.s_down, D, S),
                   gg(o.s_gate, S, D), g(o.s_up, S, D), g(o.s_down, D, S));
    else
      be.memzero(dm.data, size_t(n) * D * dtype_size(ct));
    for (int e = 0; e < X; ++e) {
      const int b = M.begin[size_t(e)], ne = M.begin[size_t(e) + 1] - b;
      if (ne == 0) continue;
      const int32_t* idx = static_cast<const int32_t*>(M.d_idx.data()) + b;
      const Tensor dY = a(dye, D).rows_view(0, ne), dX = a(dxe, D).rows_view(0, ne);
      be.memzero(dY.data, size_t(ne) * D * dtype_size(ct));
      be.add_rows(dY, nullptr, dout, idx, ne, static_cast<const float*>(M.d_gates.data()) + b, Tensor());  // g * dout
      const auto We = expert(o, e, false), Ge = expert(o, e, true);
      ffn_backward(dX, false, dY, s.xe.rows_view(b, ne), s.ge.rows_view(b, ne), s.ue.rows_view(b, ne),
                   s.ae.rows_view(b, ne), We[0], We[1], We[2], Ge[0], Ge[1], Ge[2]);
      be.add_rows(dm, idx, dX, nullptr, ne, nullptr, Tensor());
    }
    const Tensor dL = upload(std::vector<float>(dl.begin(), dl.end()), n, X);
    be.linear_backward(dm, g(o.moe_router, X, D), dL, s.m, w(o.moe_router, X, D), true);
  }

  // ---- host transfers for a true layer's router (float32 on the host, any type on the device) ----
  std::vector<float> download(Tensor t) {
    std::vector<float> out(size_t(t.rows) * size_t(t.cols));
    if (out.empty()) return out;
    HM_ASSERT(t.ld == t.cols);
    if (t.dtype == DType::F32) {
      be.to_host(out.data(), t.data, sizeof(float) * out.size());
    } else {
      std::vector<uint16_t> h16(out.size());
      be.to_host(h16.data(), t.data, sizeof(uint16_t) * h16.size());
      convert_to_f32(out.data(), h16.data(), t.dtype, out.size());
    }
    return out;
  }
  // rows x D floats from the host into hostbuf, in the compute type, as a tensor.
  Tensor upload(const std::vector<float>& v, int rows, int cols) {
    const Tensor t = act(be, hostbuf, ct, rows, cols);
    if (v.empty()) return t;
    if (ct == DType::F32) {
      be.to_device(t.data, v.data(), sizeof(float) * v.size());
    } else {
      std::vector<uint16_t> h16(v.size());
      convert_from_f32(h16.data(), ct, v.data(), v.size());
      be.to_device(t.data, h16.data(), sizeof(uint16_t) * h16.size());
    }
    return t;
  }
  std::vector<float> param(int64_t off, int count) {
    std::vector<float> v(static_cast<size_t>(count));
    be.to_host(v.data(), master + off, sizeof(float) * v.size());
    return v;
  }
  // Adds a host gradient into the float32 arena at off (through a float32 upload).
  template <class V> void add_grad(int64_t off, const V& v) {
    std::vector<float> f(v.begin(), v.end());
    const Tensor t = act(be, hostbuf, DType::F32, 1, int(f.size()));
    be.to_device(t.data, f.data(), sizeof(float) * f.size());
    be.add_rows(g(off, 1, int(f.size())), nullptr, t, nullptr, 1, nullptr, Tensor());
  }

  // A true layer's mixer on s.u (model_grad.cpp's true_mixer_forward over the whole batch):
  // the router as one op (router: features and logits, 3 floats a token come back), the
  // route decisions on the host, per sequence from position 0; the Mamba path
  // over the Mamba tokens of every sequence, the attention path over the attention tokens
  // (v = u + exchange * the latest Mamba output at or before the token), fused into out [n, D].
  // A path without tokens does not run; in hard mode neither touches the tokens not chosen.
  void true_forward(int i, const LayerActs& s, Tensor out, const LayerOffsets& o) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, C = mc.routing_chunk, B = rg.nseq();
    const bool chunked = mc.routing_granularity == "chunk";
    const th::Mode mode = th::mode_from_config(mc);
    TrueState& T = *tstate[size_t(i)];
    const Tensor r_all = act(be, router_r, DType::F32, 1, n), f_all = act(be, router_f, DType::F32, n, kRouterFeatures);
    be.router(r_all, f_all, s.u, w32(o.router_w, 1, D), w32(o.router_feat, 1, kRouterFeatures),
              w32(o.router_b, 1, 1), rg, chunked ? C : 0, nullptr);
    std::vector<float> r_host(static_cast<size_t>(n)), f_host(size_t(n) * kRouterFeatures);
    be.to_host(r_host.data(), r_all.data, sizeof(float) * r_host.size());
    be.to_host(f_host.data(), f_all.data, sizeof(float) * f_host.size());
    T.feats.resize(size_t(B));
    T.r.resize(size_t(B));
    T.rt.resize(size_t(B));
    T.pmean.assign(size_t(B), 0.0);
    for (auto* v : {&T.m_rows, &T.a_rows, &T.ex_dst, &T.ex_src}) v->clear();
    T.gm.clear();
    T.ga.clear();
    T.rgm.clear();
    T.rga.clear();
    for (int b = 0; b < B; ++b) {
      const int L = rg.len(b), t0 = rg.start(b);
      std::vector<float>&f = T.feats[size_t(b)], &r = T.r[size_t(b)];
      f.assign(f_host.begin() + int64_t(t0) * kRouterFeatures, f_host.begin() + int64_t(t0 + L) * kRouterFeatures);
      r.assign(r_host.begin() + t0, r_host.begin() + t0 + L);
      th::decide_routes(T.rt[size_t(b)], r.data(), L, 0, mode, -1.0);
      const th::Routing<float>& rt = T.rt[size_t(b)];
      const int m0 = int(T.m_rows.size()), a0 = int(T.a_rows.size());
      for (int j : rt.mamba_idx) {
        T.m_rows.push_back(t0 + j);
        T.gm.push_back(rt.gm[size_t(j)]);
      }
      for (size_t k = 0; k < rt.attn_idx.size(); ++k) {
        T.a_rows.push_back(t0 + rt.attn_idx[k]);
        T.ga.push_back(rt.ga[size_t(rt.attn_idx[k])]);
        if (rt.carry[k] >= 0) {
          T.ex_dst.push_back(a0 + int(k));
          T.ex_src.push_back(m0 + rt.carry[k]);
        }
      }
      T.rgm.add(b, int(rt.mamba_idx.size()), 0);
      T.rga.add(b, int(rt.attn_idx.size()), 0);
      double ps = 0;
      for (const float pt : rt.p) ps += double(pt);
      T.pmean[size_t(b)] = ps / double(L);
      if (mode != th::Mode::Both && !recomputing) {
        const double e = T.pmean[size_t(b)] - double(mc.attention_budget);
        budget_loss += double(seq_count[size_t(b)]) * inv_total * double(mc.budget_loss_weight) * e * e;
      }
    }
    T.nm = int(T.m_rows.size());
    T.na = int(T.a_rows.size());
    std::vector<int32_t> idx(T.m_rows);
    for (const auto* v : {&T.a_rows, &T.ex_dst, &T.ex_src}) idx.insert(idx.end(), v->begin(), v->end());
    std::vector<float> gates(T.gm);
    gates.insert(gates.end(), T.ga.begin(), T.ga.end());
    T.idx.reserve(be, sizeof(int32_t) * std::max<size_t>(1, idx.size()));
    T.gates.reserve(be, sizeof(float) * std::max<size_t>(1, gates.size()));
    be.to_device(T.idx.data(), idx.data(), sizeof(int32_t) * idx.size());
    be.to_device(T.gates.data(), gates.data(), sizeof(float) * gates.size());
    T.rgm.upload(be);
    T.rga.upload(be);
    const int nm = T.nm, na = T.na, nex = int(T.ex_dst.size());
    const int32_t* d_exdst = T.d_a() + na;
    const int32_t* d_exsrc = d_exdst + nex;
    const Tensor ym = s.ym.rows_view(0, nm), ya = s.ya.rows_view(0, na);
    if (nm > 0) {
      const Tensor um = s.um.rows_view(0, nm);
      be.copy_rows(um, nullptr, s.u, T.d_m(), nm);
      if (c().is_mamba2(i))
        mamba2_forward(s, ym, um, o, T.rgm);
      else
        mamba_forward(s, ym, um, o, T.rgm);
    }
    if (na > 0) {
      const Tensor va = s.va.rows_view(0, na);
      be.copy_rows(va, nullptr, s.u, T.d_a(), na);
      if (nex > 0) be.add_rows(va, d_exdst, ym, d_exsrc, nex, nullptr, w(o.exchange, 1, D));
      attention_forward(s, ya, va, o, T.rga);
    }
    // out_t = gm_t fuse_mamba * ym_t + ga_t fuse_attn * ya_t; a path that did not run adds nothing.
    be.memzero(out.data, size_t(n) * size_t(D) * dtype_size(ct));
    if (nm > 0) be.add_rows(out, T.d_m(), ym, nullptr, nm, T.d_gm(), w(o.fuse_mamba, 1, D));
    if (na > 0) be.add_rows(out, T.d_a(), ya, nullptr, na, T.d_ga(), w(o.fuse_attn, 1, D));
  }

  // Its gradient (model_grad.cpp's true_mixer_backward): du [n, D] assigned from dout, all of it
  // as ops but the router's own parameters: n floats (dL/dp) go to the host and n come back (the
  // logits' gradients), never a [n, D] matrix.
  void true_backward(int i, Tensor du, Tensor dout, const LayerActs& s, const LayerOffsets& o) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, C = mc.routing_chunk, B = rg.nseq();
    const bool chunked = mc.routing_granularity == "chunk";
    const th::Mode mode = th::mode_from_config(mc);
    TrueState& T = *tstate[size_t(i)];
    const int nm = T.nm, na = T.na, nex = int(T.ex_dst.size());
    const Tensor ym = s.ym.rows_view(0, nm), ya = s.ya.rows_view(0, na);
    // dL/dp_t, p the router's attention probability: gm = 1 - p, ga = p (constant in both mode).
    std::vector<double> dprob(size_t(n), 0.0);
    if (mode != th::Mode::Both) {
      gate_dots(dprob, dout, ym, T.d_m(), T.m_rows, o.fuse_mamba, -1.0);
      gate_dots(dprob, dout, ya, T.d_a(), T.a_rows, o.fuse_attn, 1.0);
    }
    // The paths' output gradients dy = gate * fuse ⊙ dout at their tokens; the fuse vectors'
    // gradients sum gate * dout ⊙ y over the path's rows.
    const Tensor dYm = act(be, dym, ct, n, D).rows_view(0, nm), dYa = act(be, dya, ct, n, D).rows_view(0, na);
    path_output_grad(dYm, o.fuse_mamba, dout, ym, T.d_m(), T.d_gm());
    path_output_grad(dYa, o.fuse_attn, dout, ya, T.d_a(), T.d_ga());
    be.memzero(du.data, size_t(n) * size_t(D) * dtype_size(ct));
    // Attention first: v = u + exchange * x sends gradient to the Mamba output x was carried from.
    if (na > 0) {
      const Tensor dV = act(be, dvv, ct, n, D).rows_view(0, na);
      attention_backward(dV, dYa, Tensor(), s.va.rows_view(0, na), s, o, T.rga);
      be.add_rows(du, T.d_a(), dV, nullptr, na, nullptr, Tensor());
      if (nex > 0) {
        // Each carry e: dexchange += dV[dst] ⊙ ym[src], dYm[src] += exchange ⊙ dV[dst]; several
        // attention tokens may carry one Mamba row, so the scatter is embedding_backward's
        // (ordered, no races), not add_rows'.
        const int32_t* d_exdst = T.d_a() + na;
        const int32_t* d_exsrc = d_exdst + nex;
        const Tensor gv = act(be, ex_a, ct, nex, D), ys = act(be, ex_b, ct, nex, D), e = act(be, ex_c, ct, nex, D);
        be.copy_rows(gv, nullptr, dV, d_exdst, nex);
        be.copy_rows(ys, nullptr, ym, d_exsrc, nex);
        be.scale_cols_backward(e, g(o.exchange, 1, D), gv, ys, w(o.exchange, 1, D));
        be.embedding_backward(dYm, e, d_exsrc);
      }
    }
    if (nm > 0) {
      const Tensor dUm = act(be, dum, ct, n, D).rows_view(0, nm);
      if (c().is_mamba2(i))
        mamba2_backward(dUm, dYm, Tensor(), s.um.rows_view(0, nm), s, o, T.rgm);
      else
        mamba_backward(dUm, dYm, Tensor(), s.um.rows_view(0, nm), s, o, T.rgm);
      be.add_rows(du, T.d_m(), dUm, nullptr, nm, nullptr, Tensor());
    }
    if (mode == th::Mode::Both) return;  // constant gates, no budget: no router gradient
    // The router: dr_t = (dL/dp_t + the budget term's) p (1 - p); budget weight cnt_b x
    // budget_scale, as the cross-entropy weighs the sequence; ds_t, the gradient of token t's own
    // logit s_t = w_router . u_t + fw . f_t + b, on the host. The features are constants
    // (TRUE_HYBRID.md): du += ds w_router and dw_router += ds^T u are a one-column linear's
    // backward on the device; dfw and db are sums over n scalars.
    std::vector<float> ds(static_cast<size_t>(n)), dfw(size_t(kRouterFeatures), 0.0f), db(1, 0.0f);
    for (int b = 0; b < B; ++b) {
      const int L = rg.len(b), t0 = rg.start(b);
      const th::Routing<float>& rt = T.rt[size_t(b)];
      const double share = budget_scale * double(seq_count[size_t(b)]);
      const double dbud = share * double(mc.budget_loss_weight) * 2.0 *
                          (T.pmean[size_t(b)] - double(mc.attention_budget)) / double(L);
      std::vector<float> dr(static_cast<size_t>(L));
      for (int t = 0; t < L; ++t) {
        const double pt = rt.p[size_t(t)];
        dr[size_t(t)] = float((dprob[size_t(t0 + t)] + dbud) * pt * (1 - pt));
      }
      th::router_logit_grad(ds.data() + t0, dr.data(), L, chunked, C);
      const std::vector<float>& f = T.feats[size_t(b)];
      for (int t = 0; t < L; ++t) {
        const float g = ds[size_t(t0 + t)];
        for (int k = 0; k < kRouterFeatures; ++k) dfw[size_t(k)] += g * f[size_t(t) * kRouterFeatures + size_t(k)];
        db[0] += g;
      }
    }
    be.linear_backward(du, g(o.router_w, 1, D), upload(ds, n, 1), s.u, w(o.router_w, 1, D), true);
    add_grad(o.router_feat, dfw);
    add_grad(o.router_b, db);
  }

  // dprob[rows[j]] += sign * fuse . (y_j ⊙ dout[rows[j]]) for the path's rows j (idx: rows on the
  // device): y ⊙ fuse formed once, then one row_dots; its rows' floats come back.
  void gate_dots(std::vector<double>& dprob, Tensor dout, Tensor y, const int32_t* idx,
                 const std::vector<int32_t>& rows, int64_t fuse, double sign) {
    const int m = y.rows, D = c().d_model;
    if (m == 0) return;
    const Tensor q = act(be, ex_a, ct, m, D);
    be.memzero(q.data, size_t(m) * size_t(D) * dtype_size(ct));
    be.add_rows(q, nullptr, y, nullptr, m, nullptr, w(fuse, 1, D));
    const Tensor dots = act(be, row_dot_out, DType::F32, 1, m);
    be.row_dots(dots, dout, idx, q);
    std::vector<float> got(static_cast<size_t>(m));
    be.to_host(got.data(), dots.data, sizeof(float) * got.size());
    for (int j = 0; j < m; ++j) dprob[size_t(rows[size_t(j)])] += sign * double(got[size_t(j)]);
  }

  // dpath [m, D] = gates ⊙ fuse ⊙ dout at the path's rows (assigned), and fuse's gradient += the sum
  // over them of gate * dout ⊙ y: the gated rows gathered, then scale_cols_backward.
  void path_output_grad(Tensor dpath, int64_t fuse, Tensor dout, Tensor y, const int32_t* idx, const float* gates) {
    const int m = y.rows, D = c().d_model;
    if (m == 0) return;
    const Tensor gd = act(be, ex_b, ct, m, D);
    be.memzero(gd.data, size_t(m) * size_t(D) * dtype_size(ct));
    be.add_rows(gd, nullptr, dout, idx, m, gates, Tensor());
    be.scale_cols_backward(dpath, g(fuse, 1, D), gd, y, w(fuse, 1, D));
  }

  // Layer i's inner representation (y * silu(z) or the head contexts): the next bridge's source.
  // With ckpt, valid while the slot holds layer i.
  Tensor inner(int i) {
    const LayerActs s = acts(i);
    return c().is_attention(i) ? s.inner : c().is_mamba2(i) ? s.yn : s.yg;
  }

  // Layer i after its bridge: H (the stream entering the pre-norm, already saved in hin[i])
  // becomes the layer's output, saving its activations. The only code that computes a layer,
  // so grad_ckpt's recompute is bit-identical.
  void layer_forward(int i, Tensor H, Tensor O) {
    const ModelConfig& mc = c();
    const int D = mc.d_model;
    const float eps = float(mc.norm_eps);
    const LayerOffsets& o = lo.layers[size_t(i)];
    const LayerActs s = acts(i);
    be.rmsnorm(s.u, H, w(o.norm, 1, D), eps);
    if (mc.is_true(i))
      true_forward(i, s, O, o);
    else if (mc.is_attention(i))
      attention_forward(s, O, s.u, o, rg);
    else if (mc.is_mamba2(i))
      mamba2_forward(s, O, s.u, o, rg);
    else
      mamba_forward(s, O, s.u, o, rg);
    be.add_rows(H, nullptr, O, nullptr, n, nullptr, resid_scale());
    if (mc.has_ffn(i)) {
      be.copy(s.h2.data, H.data, size_t(n) * D * dtype_size(ct));
      be.rmsnorm(s.m, H, w(o.mlp_norm, 1, D), eps);
      if (mc.is_moe(i))
        moe_forward(i, s, O, o);
      else
        mlp_forward(s, O, o);
      be.add_rows(H, nullptr, O, nullptr, n, nullptr, resid_scale());
    }
  }
  // grad_ckpt: re-runs layer i's forward from hin[i] into the slot, in the stream and block
  // buffers (the backward is done with them).
  void recompute(int i) {
    const int D = c().d_model;
    const Tensor H = a(h, D), O = a(mix, D);
    be.copy(H.data, hin[size_t(i)].data(), size_t(n) * D * dtype_size(ct));
    recomputing = true;
    layer_forward(i, H, O);
    recomputing = false;
  }

  // The whole forward, every layer's activations kept (with ckpt: each layer's input, and the
  // last layer's activations in the slot); leaves rmsnorm(h, norm_f) in hn.
  Tensor forward() {
    const ModelConfig& mc = c();
    const int D = mc.d_model, V = mc.vocab_size;
    const float eps = float(mc.norm_eps);
    const Tensor H = a(h, D), O = a(mix, D);
    if (mc.embedding_multiplier == 1.0f) {
      be.embedding(H, w(lo.emb, V, D), static_cast<const int32_t*>(ids.data()));
    } else {  // h = embedding_multiplier * embeddings
      be.embedding(O, w(lo.emb, V, D), static_cast<const int32_t*>(ids.data()));
      scale_into(H, O, mc.embedding_multiplier);
    }
    for (int i = 0; i < mc.n_layers; ++i) {
      const LayerOffsets& o = lo.layers[size_t(i)];
      if (mc.has_bridge(i)) {  // h += gate * (rmsnorm(src) proj^T); src is still in the slot with ckpt
        const int S = mc.inner_dim(i - 1);
        const Tensor bn = bridge_norm(i), pp = a(p, D);
        be.rmsnorm(bn, inner(i - 1), w(o.bridge_norm, 1, S), eps);
        be.linear(pp, bn, w(o.bridge_proj, D, S), false);
        be.add_rows(H, nullptr, pp, nullptr, n, nullptr, w(o.bridge_gate, 1, D));
      }
      be.copy(hin[size_t(i)].data(), H.data, size_t(n) * D * dtype_size(ct));
      layer_forward(i, H, O);
    }
    const Tensor HN = a(hn, D);
    be.rmsnorm(HN, H, w(lo.norm_f, 1, D), eps);
    if (mc.logits_scaling == 1.0f) return HN;
    const Tensor HS = a(hns, D);  // logits / logits_scaling: the head's input scaled
    scale_into(HS, HN, float(1.0 / double(mc.logits_scaling)));
    return HS;
  }

  // The reverse of forward() from dhn; adds every parameter gradient but the head's. With ckpt
  // the slot still holds the last layer from the forward; once layer i's mixer backward is done,
  // layer i-1 is re-run into it, which also rebuilds the inner output layer i's bridge needs.
  void backward(Tensor dHN) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, V = mc.vocab_size;
    const float eps = float(mc.norm_eps);
    const Tensor dH = a(dh, D), dT = a(dtmp, D), H = a(h, D);
    if (mc.logits_scaling != 1.0f) {  // dHN holds the gradient of the scaled norm: scale it back
      scale_into(dT, dHN, float(1.0 / double(mc.logits_scaling)));
      be.copy(dHN.data, dT.data, size_t(n) * D * dtype_size(ct));
    }
    be.rmsnorm_backward(dH, g(lo.norm_f, 1, D), dHN, H, w(lo.norm_f, 1, D), eps, false);
    report(lo.norm_f, lo.numel);  // the final norm and an untied head
    Tensor dI;  // gradient into layer i's inner output from layer i+1's bridge (empty: none)
    for (int i = mc.n_layers - 1; i >= 0; --i) {
      const LayerOffsets& o = lo.layers[size_t(i)];
      const LayerActs s = acts(i);
      const Tensor hi = hin[size_t(i)].tensor(ct, n, D);
      if (mc.has_ffn(i)) {  // h_out = h2 + mlp(rmsnorm(h2))
        const Tensor dO = block_grad(dH);
        if (mc.is_moe(i))
          moe_backward(i, dT, dO, s, o);
        else
          mlp_backward(dT, dO, s, o);
        be.rmsnorm_backward(dH, g(o.mlp_norm, 1, D), dT, s.h2, w(o.mlp_norm, 1, D), eps, true);
      }
      const Tensor dO = block_grad(dH);  // no true layers or bridges with residual_multiplier (validate)
      if (mc.is_true(i))
        true_backward(i, dT, dO, s, o);
      else if (mc.is_attention(i))
        attention_backward(dT, dO, dI, s.u, s, o, rg);
      else if (mc.is_mamba2(i))
        mamba2_backward(dT, dO, dI, s.u, s, o, rg);
      else
        mamba_backward(dT, dO, dI, s.u, s, o, rg);
      be.rmsnorm_backward(dH, g(o.norm, 1, D), dT, hi, w(o.norm, 1, D), eps, true);
      // Layer i's activations are dead: the slot takes layer i-1, whose inner output the bridge needs.
      if (ckpt && i > 0) recompute(i - 1);
      dI = Tensor();
      if (mc.has_bridge(i)) {  // h = h_in + gate * (bn proj^T): dh passes through as is
        const int S = mc.inner_dim(i - 1);
        const Tensor bn = bridge_norm(i), pp = a(p, D), dP = a(dp, D), dY = a(dy, S);
        if (ckpt) be.rmsnorm(bn, inner(i - 1), w(o.bridge_norm, 1, S), eps);
        be.linear(pp, bn, w(o.bridge_proj, D, S), false);  // recomputed: cheaper than keeping it
        be.scale_cols_backward(dP, g(o.bridge_gate, 1, D), dH, pp, w(o.bridge_gate, 1, D));
        be.linear_backward(dY, g(o.bridge_proj, D, S), dP, bn, w(o.bridge_proj, D, S), false);
        dI = a(dbridge, S);
        be.rmsnorm_backward(dI, g(o.bridge_norm, 1, S), dY, inner(i - 1), w(o.bridge_norm, 1, S), eps, false);
      }
      report(layer_begin(i), layer_begin(i + 1));
    }
    Tensor dE = dH;  // with respect to the embedding rows
    if (mc.embedding_multiplier != 1.0f) {
      dE = dT;
      scale_into(dE, dH, mc.embedding_multiplier);
    }
    be.embedding_backward(g(lo.emb, V, D), dE, static_cast<const int32_t*>(ids.data()));
    report(0, layer_begin(0));  // the embedding (and a tied head)
  }
};

BatchGrad::BatchGrad(Backend& be, const Params& layout, DType compute, bool grad_ckpt, int scan_chunk)
    : impl_(std::make_unique<Impl>(be, layout, compute, grad_ckpt, scan_chunk)) {
  HM_CHECK(scan_chunk >= 0, "training: scan_chunk must be >= 0, got ", scan_chunk);
  const ModelConfig& c = layout.config();
  HM_CHECK(be.supports(compute), be.name(), " backend: training cannot compute in ", compute_dtype_name(compute));
  const std::string no = training_unsupported(c);
  HM_CHECK(no.empty(), "training: the model has no backward pass yet: ", no);
}

BatchGrad::~BatchGrad() = default;

DType BatchGrad::compute() const { return impl_->ct; }
void BatchGrad::set_grads_done(std::function<void(int64_t begin, int64_t end)> fn) { impl_->grads_done = std::move(fn); }
bool BatchGrad::grad_ckpt() const { return impl_->ckpt; }
void BatchGrad::freeze_routing(bool on) { impl_->freeze = on; }

void BatchGrad::set_weights(const float* master) {
  Impl& I = *impl_;
  I.master = master;
  if (I.ct == DType::F32) {
    I.W = reinterpret_cast<const char*>(master);
    return;
  }
  // The arena as rows of at most 2^20 elements (Tensor sizes are int), then its tail.
  const int64_t total = I.lo.numel, cols = int64_t(1) << 20;
  I.wc.reserve(I.be, size_t(total) * dtype_size(I.ct));
  const int64_t rows = total / cols, tail = total - rows * cols;
  if (rows > 0)
    I.be.convert(Tensor(I.wc.data(), I.ct, int(rows), int(cols)),
                 Tensor(const_cast<float*>(master), DType::F32, int(rows), int(cols)));
  if (tail > 0)
    I.be.convert(Tensor(static_cast<char*>(I.wc.data()) + rows * cols * int64_t(dtype_size(I.ct)), I.ct, 1, int(tail)),
                 Tensor(const_cast<float*>(master) + rows * cols, DType::F32, 1, int(tail)));
  I.W = static_cast<const char*>(I.wc.data());
}

double BatchGrad::loss_and_grad(float* grads, const int32_t* tokens, const int32_t* targets, int B, int L,
                                double grad_scale) {
  HM_CHECK(impl_->ct != DType::F16, "training in f16 needs loss scaling (its gradients underflow f16's range: "
           "measured on the H200, dt_proj's gradient 0.35 off), which is not implemented; train in bf16");
  Impl& I = *impl_;
  const int64_t total = check_train_batch(I.c(), tokens, targets, B, L, 0);
  if (total == 0) return 0.0;
  HM_CHECK(int64_t(B) * L <= INT32_MAX, "training: a batch of ", B, " x ", L, " tokens is too large");
  I.G = grads;
  I.begin(tokens, targets, B, L);
  I.inv_total = 1.0 / double(total);
  I.budget_scale = grad_scale / double(total);
  I.budget_loss = 0;
  const Tensor HN = I.forward();
  const int D = I.c().d_model, V = I.c().vocab_size;
  const Tensor dHN = I.a(I.dhn, D);
  const double sum = I.be.cross_entropy_head(dHN, I.g(I.lo.head, V, D), HN, I.w(I.lo.head, V, D),
                                             static_cast<const int32_t*>(I.tgts.data()), grad_scale / double(total));
  I.backward(dHN);
  return sum / double(total);
}

double BatchGrad::loss_sum(const int32_t* tokens, const int32_t* targets, int B, int L, int64_t* counted) {
  Impl& I = *impl_;
  const int64_t total = check_train_batch(I.c(), tokens, targets, B, L, 0);
  if (counted) *counted = total;
  if (total == 0) return 0.0;
  I.G = nullptr;  // no gradients: the forward must not form pointers into a previous call's arena
  I.begin(tokens, targets, B, L);
  I.inv_total = 1.0 / double(total);
  I.budget_loss = 0;
  const Tensor HN = I.forward();
  const int D = I.c().d_model, V = I.c().vocab_size;
  // The fused head also forms gradients: scale 0 and a scratch dW, discarded.
  const Tensor dW = act(I.be, I.dW_scratch, DType::F32, V, D);
  return I.be.cross_entropy_head(I.a(I.dhn, D), dW, HN, I.w(I.lo.head, V, D),
                                 static_cast<const int32_t*>(I.tgts.data()), 0.0);
}

double BatchGrad::budget_loss() const { return impl_->budget_loss; }

std::vector<double> BatchGrad::route_logits() const {
  const Impl& I = *impl_;
  std::vector<double> out;
  for (int b = 0; b < I.rg.nseq(); ++b)
    for (const auto& t : I.tstate)
      if (t && size_t(b) < t->r.size()) out.insert(out.end(), t->r[size_t(b)].begin(), t->r[size_t(b)].end());
  return out;
}

size_t BatchGrad::activation_bytes() const {
  const Impl& I = *impl_;
  size_t b = I.bnb.bytes();
  for (const Buffer& x : I.hin) b += x.bytes();
  for (const Buffer& x : I.arenas) b += x.bytes();
  for (const Buffer* x : {&I.h, &I.mix, &I.hn, &I.p, &I.dh, &I.dtmp, &I.dbridge, &I.dy, &I.dhn, &I.dp, &I.dyg, &I.dxc,
                          &I.ddt, &I.dz, &I.ddbc, &I.dinn, &I.dq, &I.dk, &I.dv, &I.da, &I.dg, &I.dup, &I.dW_scratch, &I.dym, &I.dya, &I.dvv, &I.dum, &I.hostbuf,
                          &I.dye, &I.dxe, &I.row_dot_out, &I.ex_a, &I.ex_b, &I.ex_c, &I.router_r, &I.router_f})
    b += x->bytes();
  return b;
}

}  // namespace hm
