// The hybrid model: a stack of Mamba, attention and true-hybrid blocks (docs/MODEL.md,
// docs/TRUE_HYBRID.md) run over a ragged batch. One forward path serves prefill and decoding: a decode step is a batch of
// one-token chunks that continue their sequences from the state in HybridMemory, so prefill and
// decode compute the same function by construction.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/moe.h"
#include "model/params.h"
#include "model/true_hybrid.h"
#include "runtime/memory.h"

namespace hm {

// n_tokens tokens appended to the sequence in `slot` (continuing from its current position).
struct SeqChunk {
  int slot = 0;
  int n_tokens = 0;
};

// Tokens of all chunks packed back to back, chunk after chunk.
struct Batch {
  std::vector<int32_t> tokens;
  std::vector<SeqChunk> seqs;
  bool logits_all = false;  // false: logits of each chunk's last token only
  void add(int slot, const std::vector<int32_t>& toks) {
    tokens.insert(tokens.end(), toks.begin(), toks.end());
    seqs.push_back({slot, int(toks.size())});
  }
};

// Scratch activations in the backend's memory (bytes), grown to the largest batch seen.
struct Workspace {
  Buffer h, u, xz, xc, dbc, dt, q, k, v, g, up, act, rows, logits;
  Buffer inner[2];  // a layer's inner output (scan output or attention context): layer i writes
                    // inner[i % 2], and the bridge of layer i + 1 reads it
  Buffer gath, ym, ya;  // true-hybrid layers: gathered path inputs, compact path outputs
  Buffer ssd;           // Mamba-2 layers: the scan's output, before the gated norm
  Buffer moe_logits;    // MoE layers: router logits [n, experts], float32
  Buffer route_logits;  // true-hybrid layers: router logits [1, n], float32
  Buffer bcdt;          // mamba_bcdt_norm: normalized dt_r [n, R], B [n, N], C [n, N], one after another
  Buffer ids, idx, gates;  // token ids, row indices and row gates uploaded for one forward
  Buffer zeros;            // mamba_proj_bias: T int32 zeros, the row index of a bias added to every row
};

// The weights as the backend computes with them: views into Params' float32 arena on a host
// backend computing in float32, else one converted copy in the backend's memory.
struct LayerTensors {
  Tensor norm, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, Dskip, out_proj;
  Tensor wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down;
  Tensor wqkv;  // wq | wk | wv as one [QW + 2 KW, D] view where the three lie end to end
  Tensor fuse_mamba, fuse_attn, exchange, bridge_norm, bridge_proj, bridge_gate;
  Tensor ssm_norm;  // Mamba-2's gated RMSNorm weight [d_inner]
  // Off a host backend, where the next layer's bridge is folded into this layer's output
  // projection: [W_out ; diag(gate) . bridge_proj . diag(bridge_norm)] (Backend::linear_bridge's
  // `folded`, prepare()); empty otherwise.
  Tensor out_bridge;
  // Off a host backend, a Mamba-1 layer's pre-norm weight g lives in in_proj's columns (in_proj =
  // W diag(g), norm = ones; HybridModel::folds_norm): a decode step may then project the
  // residual itself and apply 1 / rms afterwards (Backend::mamba_in's unit_norm).
  bool norm_folded = false;
  Tensor dt_norm, b_norm, c_norm;  // mamba_bcdt_norm_weight: the dt, B and C norms' weights
  Tensor in_b, out_b;  // mamba_proj_bias: in_proj's and out_proj's biases
  Tensor moe_router;                          // MoE layers: [experts, D]
  Tensor router_w, router_fw, router_b;       // true-hybrid layers: [1, D], [1, kRouterFeatures], [1, 1], float32
  std::vector<Tensor> e_gate, e_up, e_down;   // and each expert's W
  Tensor s_gate, s_up, s_down;                // the shared expert's (moe_shared_ff)
};

// What the routers of the true-hybrid layers decided in the last forward (set_route_trace).
struct RouteTrace {
  std::vector<int> layers;  // the true-hybrid layers, in order
  // [index into layers][token of the batch, in packed order]
  std::vector<std::vector<float>> p;                 // the router's attention probability
  std::vector<std::vector<th::Route>> route;
  std::vector<std::vector<double>> attention_share;  // th::attention_share; Mamba's is 1 - it
};

class HybridModel {
 public:
  // dtype: the type weights and activations are computed in (the backend's default when not
  // given: float32 on the CPU, bf16 on CUDA). Sums, recurrent state and logits stay float32.
  HybridModel(const ModelConfig& c, Backend& be);
  HybridModel(const ModelConfig& c, Backend& be, DType dtype);
  ~HybridModel();  // makes released arena rows (release_float_weights) writable again
  const ModelConfig& config() const { return cfg_; }
  // The float32 arena; an hm::Error after release_float_weights().
  Params& params() { check_floats_kept(); return params_; }
  const Params& params() const { check_floats_kept(); return params_; }
  // The arena even after release_float_weights(), for code that reads only tensors that are
  // not packed (save_packed_params): a packed weight's rows are then unreadable.
  const Params& kept_params() const { return params_; }
  Backend& backend() const { return be_; }

  DType dtype() const { return dtype_; }

  // The format the linear layers' weights are stored in (issue 17): F32 (the default: the
  // compute type) or, on a backend that supports it (supports_weight_format: the CPU), BF16,
  // F16, Q8_0 or Q4_0 (kernels/quant.h), packed from the float32 arena by the next prepare(). Packed:
  // in_proj, x_proj, dt_proj, out_proj (Mamba-2: in_proj, out_proj), q/k/v/o, the MLP, bridge
  // projections and the LM head (a tied head gets a packed copy; the embedding lookup keeps
  // float32); q8_0 / q4_0 leave a weight whose row length is not a multiple of 32 in float32
  // (dt_proj at dt_rank 48). Norms, conv, biases, A_log, D, routers, fusion scales and
  // embeddings stay float32. Needs dtype() F32 (docs/QUANTIZATION.md).
  void set_weight_format(DType f);
  DType weight_format() const { return wfmt_; }
  // The packed weights of the last prepare(): each one's arena view (the float32 weights it was
  // packed from) and its packed tensor in backend memory. Checkpoints store these packed.
  struct PackedWeight {
    const float* host;
    Tensor t;
  };
  const std::vector<PackedWeight>& packed_weights() const { return packed_; }

  // Inference without the float32 copies of packed weights (issue 17: resident memory).
  // linear_weights(): every W prepare() passes to its packing rule, packed or not (dt_proj at a
  // dt_rank that is not a multiple of 32 stays float32); packs(cols): whether the format packs a
  // W of that row length. stage_packed(): this format's packed rows for the W at host, which the
  // next prepare() takes instead of packing the arena's rows, so a loader that packs as it reads
  // (load_packed_for_inference) never fills them; prepare() checks that it took every staged W
  // and that it read no unfilled rows. release_float_weights() (after prepare) returns the arena
  // rows of packed weights to the OS and makes them unreadable; afterwards params(), prepare()
  // and set_weight_format() are hm::Errors. The embedding table, which a tied head is packed
  // from, is kept. Saving still works: packed weights are saved from their packed copies.
  struct LinearRef {
    const float* host;
    int rows, cols;
  };
  std::vector<LinearRef> linear_weights() const;
  bool packs(int cols) const { return wfmt_ != DType::F32 && !(is_packed(wfmt_) && cols % 32 != 0); }
  void stage_packed(const float* host, std::vector<unsigned char> bytes);
  void release_float_weights();
  bool float_weights_released() const { return !released_.empty(); }

  // Call after the parameters change (init, load): derives A = -exp(A_log) and, on a backend
  // that does not compute on the float32 arena itself, uploads the weights in dtype().
  void prepare();

  // Runs the batch and advances each chunk's sequence in mem. logits (host) receives
  // [n_tokens, vocab] when batch.logits_all, else [n_chunks, vocab]. Bad input (token id out
  // of range, slot out of range or repeated, context overflow) throws hm::Error.
  void forward(const Batch& batch, HybridMemory& mem, std::vector<float>& logits);
  // As forward, leaving the float32 logits in the backend's memory (valid until the next call).
  Tensor forward_device(const Batch& batch, HybridMemory& mem);

  // Bytes of weights the backend holds: the arena in dtype(), each packed weight counted in its
  // format instead of float32 (a tied head's packed copy on top of the embedding).
  // Bytes of the scratch activations held now (grown to the largest batch seen; the backend's
  // own workspaces, e.g. CUDA's scan chunk states, are not counted).
  size_t workspace_bytes() const;
  int64_t weight_bytes() const { return params_.numel() * int64_t(dtype_size(dtype_)) + packed_delta_; }

  // Benchmarks and tests: send a fraction f of every sequence's tokens to attention in each
  // true-hybrid layer (th::forced_to_attention), whatever the router says; f < 0 lets the router
  // decide again. Only hard routing skips a path, so forcing in soft or both mode (or on a model
  // without true-hybrid layers) is an hm::Error.
  void set_forced_attention_fraction(double f);
  double forced_attention_fraction() const { return force_f_; }
  // Records the routes of every later forward into *t (null: stop recording).
  void set_route_trace(RouteTrace* t) { trace_ = t; }
  // Decode steps (every chunk one token, last-token logits) of a model without true-hybrid or
  // MoE layers (their routing is read back on the host) are recorded once per batch size and memory as a graph and replayed, on backends
  // with graphs (CUDA): one launch per step instead of one per op. On by default.
  void set_graphs(bool on) { use_graphs_ = on; graphs_.clear(); warmed_.clear(); }
  // Prefills too (every other batch shape), recorded per shape (each chunk's length, the logits
  // wanted) and memory: a repeated shape replays at any positions and slots. Off unless
  // HM_PREFILL_GRAPHS=1: a server's steps rarely repeat a shape, and recording the ones that
  // never replay cost more than replays saved (docs/PERFORMANCE.md, "Stop 39").
  void set_prefill_graphs(bool on) { prefill_graphs_ = on; graphs_.clear(); warmed_.clear(); }
  int graphs_captured() const { return graphs_captured_; }
  // Whether attention layers project q | k | v in one linear (tagged by wq), set by prepare().
  bool fused_qkv() const { return fused_qkv_; }
  // How many state bridges run inside the output projection of the layer before (prepare()).
  int folded_bridges() const;

 private:
  Tensor weight(const float* host, int rows, int cols) const;  // the backend's copy of a Params view
  // A linear layer's W: packed in weight_format() by the rule of set_weight_format, else weight().
  Tensor linear_weight(const float* host, int rows, int cols);
  void bridge(int layer, int T);
  // normed: ws_.u already holds the layer's pre-normed input (project_out of the layer before).
  void mamba_layer(int layer, HybridMemory& mem, bool normed);
  void attention_layer(int layer, HybridMemory& mem, bool normed);
  void true_layer(int layer, HybridMemory& mem);
  // The two paths over the compact rows x [n, D] of the ragged batch rg: out [n, D] (=|+=).
  // norm_w: x is the residual stream, pre-normed inside (Backend::mamba_in); empty: x is normed.
  void mamba_path(int layer, Tensor x, const Ragged& rg, Tensor out, bool accumulate, HybridMemory& mem,
                  Tensor norm_w = Tensor());
  void mamba2_path(int layer, Tensor x, const Ragged& rg, Tensor out, bool accumulate, HybridMemory& mem,
                   Tensor norm_w = Tensor());
  // The next layer's tensors when its state bridge runs inside this layer's output projection
  // (linear_bridge): nothing may touch h in between (no MLP, no residual scale) and the
  // projection's input must be the inner output the bridge reads (Mamba-1 without biases or
  // attention, not a true-hybrid layer). nullptr otherwise.
  const LayerTensors* folded_bridge(int layer) const;
  // out (+)= y . W^T, the layer's output projection, with folded_bridge(layer)'s bridge; sets
  // next_normed_ where the backend also wrote the next layer's pre-normed input into ws_.u.
  void project_out(int layer, Tensor out, Tensor y, Tensor W, bool accumulate);
  // x raw with norm_w (the layer's pre-norm, applied here), else already normed.
  void attention_path(int layer, Tensor x, const Ragged& rg, Tensor out, bool accumulate, HybridMemory& mem,
                      Tensor norm_w = Tensor());
  void mlp(int layer, int T);
  // dst[i, :] += b[0, :] for every row i < dst.rows (b a [1, dst.cols] weight), through add_rows
  // with ws_.zeros as the source rows.
  void add_bias(Tensor dst, Tensor b);
  // An expert or shared MLP on x [n, D] (mlp_act: down(silu(gate x) * up x) or down(relu(up x)^2),
  // gate unused then) into y [n, D], overwritten or accumulated.
  void ffn(Tensor y, Tensor x, Tensor gate, Tensor up, Tensor down, bool accumulate);
  void moe(int layer, int T);
  // Where a mixer or FFN writes its output over T rows: h itself (accumulated), or, with a
  // residual_multiplier, scratch that join_residual then adds to h scaled.
  Tensor residual_target(int T);
  void join_residual(Tensor out);
  void prepare_scales();  // scales_ and the tensors into it (prepare)
  bool folds_norm(int layer) const;  // LayerTensors::norm_folded (prepare)
  void prepare_folds();   // LayerTensors::out_bridge and folds_ (prepare)
  // Batches of at most this many tokens take the folded bridge (project_out).
  static constexpr int kFoldRows = 256;
  // Rows of a workspace buffer as a [rows, cols] tensor of the activation type (grown as needed).
  Tensor act(Buffer& b, int rows, int cols);
  // Host index / gate arrays into backend memory; the pointers stay valid for this forward.
  const int32_t* upload_idx(const std::vector<int32_t>& v);
  const float* upload_gates(const std::vector<float>& v);

  ModelConfig cfg_;
  Backend& be_;
  DType dtype_;
  Params params_;
  Buffer dev_weights_;                 // the converted copy (empty when views alias the arena)
  DType wfmt_ = DType::F32;
  std::vector<PackedWeight> packed_;   // made by prepare(), their bytes in packed_bufs_
  std::vector<Buffer> packed_bufs_;
  std::map<const float*, std::vector<unsigned char>> staged_;  // stage_packed, until prepare()
  bool streaming_ = false;                                      // prepare() runs on staged weights
  bool fused_qkv_ = false;  // every attention layer projects q | k | v at once (prepare)
  std::vector<std::pair<char*, size_t>> released_;              // page ranges of the arena
  void check_floats_kept() const;
  int64_t packed_delta_ = 0;           // weight_bytes() minus the arena's
  std::vector<LayerTensors> lw_;       // per layer
  Tensor embeddings_, norm_f_, lm_head_;
  Buffer ones_;                        // mamba_bcdt_norm: the weightless norms' unit w, max(R, N) wide
  // Granite's scalings as per-column vectors in the compute type: norm_f / logits_scaling [D] (the
  // final norm's weight then), and for add_rows (dst += scale * src) embedding_multiplier [D],
  // residual_multiplier [D] and attention_scale * sqrt(head_dim) [n_heads * head_dim]; empty
  // where a scaling is the identity.
  Buffer scales_;
  Tensor emb_scale_, resid_scale_, q_scale_;
  std::vector<Buffer> A_;              // per layer: -exp(A_log) [E, N] float32, [heads] for Mamba-2 (empty for attention)
  std::vector<Buffer> router_;         // per true layer off a host backend: its router's w | fw | b, float32
  std::vector<Buffer> folds_;          // per layer: the bytes of LayerTensors::out_bridge
  bool next_normed_ = false;           // run_layers: ws_.u holds the next layer's normed input
  Workspace ws_;
  Ragged rg_, rgm_, rga_;              // the batch; a true layer's Mamba and attention rows
  size_t idx_used_ = 0, gates_used_ = 0;  // upload offsets within ws_.idx / ws_.gates
  std::vector<int32_t> idx_stage_;
  std::vector<float> gate_stage_;
  double force_f_ = -1.0;
  RouteTrace* trace_ = nullptr;
  // The device work of a forward, after its inputs are uploaded: what a graph records.
  void run_layers(int T, int n_rows, Tensor hrows, HybridMemory& mem);
  // Every address a recorded decode step reads or writes: a graph is replayed only while
  // they are all unchanged.
  std::vector<const void*> graph_signature(const HybridMemory& mem) const;
  struct Graph {
    std::vector<const void*> sig;
    std::shared_ptr<void> exec;
  };
  bool use_graphs_ = true;
  bool prefill_graphs_ = false;
  // By shape: {batch size} for a decode step; {tokens, logits_all, each chunk's length} else.
  std::map<std::vector<int>, Graph> graphs_;
  std::map<std::vector<int>, std::vector<const void*>> warmed_;  // run once eagerly with these addresses
  int graphs_captured_ = 0;
  const int32_t* last_idx_ = nullptr;               // the last row of each chunk, uploaded
  // true_layer's host scratch, reused across calls
  std::vector<th::Routing<float>> routing_;  // per chunk of the batch
  std::vector<float> logit_;                  // [T]
  std::vector<float> moe_p_;                  // moe's host scratch: router logits [T, experts]
  MoeRouting moe_rt_;                         // moe's routing of the current chunk
};

// Loads config.json and model.safetensors from a checkpoint directory.
std::unique_ptr<HybridModel> load_model(const std::string& dir, Backend& be);
// Writes config.json and model.safetensors into dir (created if needed), each atomically.
void save_model(const HybridModel& m, const std::string& dir, const std::string& stored_dtype = "F32");

}  // namespace hm
