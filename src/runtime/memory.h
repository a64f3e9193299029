// Per-sequence inference state, composed as llama.cpp's hybrid memory is: a KV cache for the
// attention layers and a recurrent state (conv window + SSM state) for the Mamba layers, behind
// one interface addressed by sequence slot.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"

namespace hm {

// Element type of the KV cache. F16 (the default, as in llama.cpp) halves the bytes that
// decoding reads per token at long contexts; F32 keeps attention bit-comparable with a float32
// reference (the golden tests use it).
enum class KvType : uint8_t { F32, F16 };
KvType kv_type_from_name(const std::string& name);  // "f32" | "f16", hm::Error otherwise
size_t kv_type_size(KvType t);

// K (after RoPE) and V of every position of every sequence, per attention layer.
class KVCache {
 public:
  KVCache(Backend& be, const ModelConfig& c, int n_slots, int max_ctx, KvType type);
  // [max_ctx, n_kv_heads * head_dim] of type(); allocated on first use of the slot.
  void* k(int layer, int slot);
  void* v(int layer, int slot);
  KvType type() const { return type_; }
  int max_ctx() const { return max_ctx_; }
  size_t bytes_reserved() const;

 private:
  void* get(std::vector<Buffer>& bufs, int layer, int slot);
  Backend& be_;
  KvType type_;
  std::vector<int> layer_index_;  // model layer -> attention layer number, -1 for Mamba
  int n_slots_, max_ctx_, row_;
  std::vector<Buffer> k_, v_;     // [attention layer][slot]
};

// Constant-size state of each Mamba layer: cost per decoded token does not grow with context.
class RecurrentState {
 public:
  RecurrentState(Backend& be, const ModelConfig& c, int n_slots);
  float* conv(int layer, int slot);  // [d_inner, d_conv - 1]: the last inputs, oldest first
  float* ssm(int layer, int slot);   // [d_inner, d_state]
  void clear(int slot);
  void copy(int src_slot, int dst_slot);
  size_t bytes_reserved() const;

 private:
  Backend& be_;
  std::vector<int> layer_index_;  // model layer -> Mamba layer number, -1 for attention
  int n_slots_, conv_n_, ssm_n_;
  std::vector<Buffer> conv_, ssm_;  // [Mamba layer * n_slots + slot]
  std::vector<float> zeros_;
};

class HybridMemory {
 public:
  HybridMemory(Backend& be, const ModelConfig& c, int n_slots, int max_ctx, KvType kv = KvType::F16);
  KVCache& kv() { return kv_; }
  RecurrentState& recurrent() { return rs_; }
  int n_slots() const { return int(pos_.size()); }
  int max_ctx() const { return kv_.max_ctx(); }
  int pos(int slot) const { return pos_.at(size_t(slot)); }  // tokens the sequence holds
  void advance(int slot, int n) { pos_.at(size_t(slot)) += n; }
  void seq_rm(int slot);                // forget a sequence: position 0, zero state
  void seq_cp(int src, int dst);        // dst continues exactly as src would
  size_t bytes_reserved() const { return kv_.bytes_reserved() + rs_.bytes_reserved(); }

 private:
  Backend& be_;
  ModelConfig cfg_;
  KVCache kv_;
  RecurrentState rs_;
  std::vector<int> pos_;
};

}  // namespace hm
