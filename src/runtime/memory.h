// Per-sequence inference state, composed as llama.cpp's hybrid memory is: a KV cache for the
// attention layers and a recurrent state (conv window + SSM state) for the Mamba layers, behind
// one interface addressed by sequence slot.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"

namespace hm {

// Element type of the KV cache. F16 (the CPU default, as in llama.cpp) halves the bytes that
// decoding reads per token at long contexts; F32 keeps attention bit-comparable with a float32
// reference (the golden tests use it); BF16 and F16 on CUDA.
using KvType = DType;
KvType kv_type_from_name(const std::string& name);  // "f32" | "f16" | "bf16", hm::Error otherwise
size_t kv_type_size(KvType t);

// K (after RoPE) and V of the positions each sequence holds, per layer with an attention path:
// one pool per layer, [n_slots, max_ctx, n_kv_heads * head_dim] of type() for K and for V.
// On the CPU the pool's pages are committed by the OS as positions are written, so memory
// follows the context actually used.
class KVCache {
 public:
  KVCache(Backend& be, const ModelConfig& c, int n_slots, int max_ctx, KvType type);
  KvPool pool(int layer) const;
  void* k(int layer, int slot) const { return pool(layer).k_at(slot); }
  void* v(int layer, int slot) const { return pool(layer).v_at(slot); }
  // K/V rows held (rows [0, len) are valid). An attention layer holds one per position; a
  // true-hybrid layer only those of the tokens routed to attention (docs/TRUE_HYBRID.md).
  int len(int layer, int slot) const { return len_[index(layer, slot)]; }
  void set_len(int layer, int slot, int n) { len_[index(layer, slot)] = n; }
  void clear(int slot);  // every layer's len to 0
  // The row count after the sequence's first `pos` positions, so that the prefix cache can cut a
  // many-block prompt chunk into blocks: pos itself in a plain attention layer; in a true layer
  // what push_rows recorded, for pos from the slot's last clear or reset_rows_at up to its
  // position.
  int rows_at(int layer, int slot, int pos) const;
  void push_rows(int layer, int slot, int rows);  // a true layer: the count after the next position
  void reset_rows_at(int slot, int pos);          // the counts at pos are len(); none before it
  void copy_rows_at(int src_slot, int dst_slot);
  KvType type() const { return type_; }
  int max_ctx() const { return max_ctx_; }
  size_t bytes_reserved() const;

 private:
  size_t index(int layer, int slot) const;
  KvType type_;
  std::vector<int> layer_index_;  // model layer -> attention layer number, -1 for Mamba
  int n_slots_, max_ctx_, row_;
  std::vector<Buffer> k_, v_;     // [attention layer]: the pools
  std::vector<int> len_;          // [attention layer][slot]
  struct RowsAt {
    int from = 0;                 // rows[k]: the row count after position from + k
    std::vector<int> rows{0};     // a true layer's reserves max_ctx + 1 (host memory)
  };
  std::vector<bool> routed_;      // [attention layer]: a true layer (rows only for some tokens)
  std::vector<RowsAt> rows_at_;   // [attention layer][slot], used for true layers
};

// Constant-size state of each Mamba layer: cost per decoded token does not grow with context.
// One float32 pool per layer and kind: the conv window [n_slots, channels, d_conv - 1] (channels
// d_inner, or x | B | C = d_inner + 2 groups d_state for Mamba-2) and the SSM state
// [n_slots, d_inner, d_state] (for Mamba-2 that is [heads, head_dim, d_state] per slot).
class RecurrentState {
 public:
  RecurrentState(Backend& be, const ModelConfig& c, int n_slots);
  StatePool conv_pool(int layer) const;
  StatePool ssm_pool(int layer) const;
  float* conv(int layer, int slot) const { return conv_pool(layer).at(slot); }  // the last inputs, oldest first
  float* ssm(int layer, int slot) const { return ssm_pool(layer).at(slot); }
  void clear(int slot);
  void copy(int src_slot, int dst_slot);
  size_t bytes_reserved() const;

 private:
  int index(int layer) const;
  Backend& be_;
  std::vector<int> layer_index_;  // model layer -> Mamba layer number, -1 for attention
  int n_slots_, ssm_n_;
  std::vector<int> conv_n_;         // [Mamba layer]: floats of one slot's conv window
  std::vector<Buffer> conv_, ssm_;  // [Mamba layer]: the pools
};

// Per true-hybrid layer and sequence, what the router and the cross-path exchange carry from
// one call to the next (docs/TRUE_HYBRID.md), both in backend memory: the analyzer's state (the
// EMA m of u [D], then the logit of the current chunk: Backend::router's StatePool) and x, the
// last Mamba-path output, in the model's activation type (the exchange reads it).
class RouteState {
 public:
  RouteState(Backend& be, const ModelConfig& c, int n_slots);
  StatePool analyzer(int layer) const;  // slot_stride D + 1, float32
  // x of every slot, [n_slots, D] of type t (the pool holds room for float32 rows, so the
  // byte layout of a slot does not depend on t).
  Tensor last_mamba(int layer, DType t) const;
  StatePool last_mamba_pool(int layer) const;  // the same memory as float32 slots of D (for copies)
  void clear(int slot);
  void copy(int src_slot, int dst_slot);
  size_t bytes_reserved() const;

 private:
  int index(int layer) const;
  std::array<StatePool, 2> pools(size_t t) const;  // true layer t's analyzer and x
  Backend& be_;
  std::vector<int> layer_index_;  // model layer -> true layer number, -1 for others
  int n_slots_, d_;
  std::vector<Buffer> an_, x_;    // [true layer]: n_slots * (D + 1) floats, n_slots * D * 4 bytes
};

class HybridMemory {
 public:
  HybridMemory(Backend& be, const ModelConfig& c, int n_slots, int max_ctx, KvType kv = KvType::F16);
  KVCache& kv() { return kv_; }
  RecurrentState& recurrent() { return rs_; }
  RouteState& route() { return route_; }
  int n_slots() const { return int(pos_.size()); }
  int max_ctx() const { return kv_.max_ctx(); }
  int pos(int slot) const { return pos_.at(size_t(slot)); }  // tokens the sequence holds
  void advance(int slot, int n) { pos_.at(size_t(slot)) += n; }
  void seq_rm(int slot);                // forget a sequence: position 0, zero state
  void seq_cp(int src, int dst);        // dst continues exactly as src would
  Backend& backend() const { return be_; }
  size_t bytes_reserved() const {
    return kv_.bytes_reserved() + rs_.bytes_reserved() + route_.bytes_reserved() +
           pos_.size() * sizeof(int);
  }

 private:
  Backend& be_;
  ModelConfig cfg_;
  KVCache kv_;
  RecurrentState rs_;
  RouteState route_;
  std::vector<int> pos_;
};

}  // namespace hm
