#include "runtime/memory.h"

#include "core/error.h"

namespace hm {

KvType kv_type_from_name(const std::string& name) {
  if (name == "f32") return KvType::F32;
  if (name == "f16") return KvType::F16;
  throw Error(detail::cat("kv cache type must be f32 or f16, got '", name, "'"));
}

size_t kv_type_size(KvType t) { return t == KvType::F32 ? 4 : 2; }

KVCache::KVCache(Backend& be, const ModelConfig& c, int n_slots, int max_ctx, KvType type)
    : be_(be), type_(type), n_slots_(n_slots), max_ctx_(max_ctx), row_(c.n_kv_heads * c.head_dim()) {
  HM_CHECK(n_slots > 0, "memory: number of sequences must be > 0, got ", n_slots);
  HM_CHECK(max_ctx > 0, "memory: context size must be > 0, got ", max_ctx);
  int n_attn = 0;
  for (int i = 0; i < c.n_layers; ++i) layer_index_.push_back(c.has_attention_path(i) ? n_attn++ : -1);
  k_.resize(size_t(n_attn) * n_slots);
  v_.resize(size_t(n_attn) * n_slots);
  len_.assign(size_t(n_attn) * n_slots, 0);
}

size_t KVCache::index(int layer, int slot) const {
  const int a = layer_index_.at(size_t(layer));
  HM_ASSERT(a >= 0 && slot >= 0 && slot < n_slots_);
  return size_t(a) * n_slots_ + slot;
}

void KVCache::clear(int slot) {
  HM_ASSERT(slot >= 0 && slot < n_slots_);
  for (size_t a = 0; a * n_slots_ < len_.size(); ++a) len_[a * n_slots_ + slot] = 0;
}

void* KVCache::get(std::vector<Buffer>& bufs, int layer, int slot) {
  Buffer& b = bufs[index(layer, slot)];
  // Lazily allocated and never zeroed: only positions < pos are ever read, and pages are
  // committed by the OS as positions are written, so memory follows the context actually used.
  if (!b.data()) b = Buffer(be_, (size_t(max_ctx_) * row_ * kv_type_size(type_) + 3) / 4);
  return b.data();
}

void* KVCache::k(int layer, int slot) { return get(k_, layer, slot); }
void* KVCache::v(int layer, int slot) { return get(v_, layer, slot); }

size_t KVCache::bytes_reserved() const {
  size_t n = 0;
  for (const auto& b : k_) n += b.size() * sizeof(float);
  for (const auto& b : v_) n += b.size() * sizeof(float);
  return n + len_.size() * sizeof(int);
}

RecurrentState::RecurrentState(Backend& be, const ModelConfig& c, int n_slots)
    : be_(be), n_slots_(n_slots), conv_n_(c.d_inner() * (c.d_conv - 1)), ssm_n_(c.d_inner() * c.d_state) {
  int n_mamba = 0;
  for (int i = 0; i < c.n_layers; ++i) layer_index_.push_back(c.has_mamba_path(i) ? n_mamba++ : -1);
  for (int m = 0; m < n_mamba * n_slots; ++m) {
    conv_.emplace_back(be_, size_t(conv_n_));
    ssm_.emplace_back(be_, size_t(ssm_n_));
  }
  zeros_.assign(size_t(std::max(conv_n_, ssm_n_)), 0.0f);
  for (int s = 0; s < n_slots; ++s) clear(s);
}

float* RecurrentState::conv(int layer, int slot) {
  const int m = layer_index_.at(size_t(layer));
  HM_ASSERT(m >= 0 && slot >= 0 && slot < n_slots_);
  return conv_[size_t(m) * n_slots_ + slot].data();
}

float* RecurrentState::ssm(int layer, int slot) {
  const int m = layer_index_.at(size_t(layer));
  HM_ASSERT(m >= 0 && slot >= 0 && slot < n_slots_);
  return ssm_[size_t(m) * n_slots_ + slot].data();
}

void RecurrentState::clear(int slot) {
  for (size_t m = 0; m * n_slots_ < conv_.size(); ++m) {
    be_.to_device(conv_[m * n_slots_ + slot].data(), zeros_.data(), sizeof(float) * size_t(conv_n_));
    be_.to_device(ssm_[m * n_slots_ + slot].data(), zeros_.data(), sizeof(float) * size_t(ssm_n_));
  }
}

void RecurrentState::copy(int src, int dst) {
  std::vector<float> tmp(size_t(std::max(conv_n_, ssm_n_)));
  for (size_t m = 0; m * n_slots_ < conv_.size(); ++m) {
    be_.to_host(tmp.data(), conv_[m * n_slots_ + src].data(), sizeof(float) * size_t(conv_n_));
    be_.to_device(conv_[m * n_slots_ + dst].data(), tmp.data(), sizeof(float) * size_t(conv_n_));
    be_.to_host(tmp.data(), ssm_[m * n_slots_ + src].data(), sizeof(float) * size_t(ssm_n_));
    be_.to_device(ssm_[m * n_slots_ + dst].data(), tmp.data(), sizeof(float) * size_t(ssm_n_));
  }
}

size_t RecurrentState::bytes_reserved() const {
  return (conv_.size() * size_t(conv_n_) + ssm_.size() * size_t(ssm_n_)) * sizeof(float);
}

RouteState::RouteState(Backend& be, const ModelConfig& c, int n_slots)
    : be_(be), n_slots_(n_slots), d_(c.d_model), n_(2 * c.d_model + 1) {
  int n_true = 0;
  for (int i = 0; i < c.n_layers; ++i) layer_index_.push_back(c.is_true(i) ? n_true++ : -1);
  for (int t = 0; t < n_true * n_slots; ++t) st_.emplace_back(be_, size_t(n_));
  zeros_.assign(size_t(n_), 0.0f);
  for (int s = 0; s < n_slots; ++s) clear(s);
}

float* RouteState::get(int layer, int slot) {
  const int t = layer_index_.at(size_t(layer));
  HM_ASSERT(t >= 0 && slot >= 0 && slot < n_slots_);
  return st_[size_t(t) * n_slots_ + slot].data();
}

void RouteState::clear(int slot) {
  for (size_t t = 0; t * n_slots_ < st_.size(); ++t)
    be_.to_device(st_[t * n_slots_ + slot].data(), zeros_.data(), sizeof(float) * size_t(n_));
}

void RouteState::copy(int src, int dst) {
  std::vector<float> tmp(static_cast<size_t>(n_));
  for (size_t t = 0; t * n_slots_ < st_.size(); ++t) {
    be_.to_host(tmp.data(), st_[t * n_slots_ + src].data(), sizeof(float) * size_t(n_));
    be_.to_device(st_[t * n_slots_ + dst].data(), tmp.data(), sizeof(float) * size_t(n_));
  }
}

size_t RouteState::bytes_reserved() const { return st_.size() * size_t(n_) * sizeof(float); }

HybridMemory::HybridMemory(Backend& be, const ModelConfig& c, int n_slots, int max_ctx, KvType kv)
    : be_(be), cfg_(c), kv_(be, c, n_slots, max_ctx, kv), rs_(be, c, n_slots), route_(be, c, n_slots),
      pos_(size_t(n_slots), 0) {}

void HybridMemory::seq_rm(int slot) {
  HM_ASSERT(slot >= 0 && slot < n_slots());
  pos_[size_t(slot)] = 0;
  kv_.clear(slot);
  rs_.clear(slot);
  route_.clear(slot);
}

void HybridMemory::seq_cp(int src, int dst) {
  HM_ASSERT(src >= 0 && src < n_slots() && dst >= 0 && dst < n_slots());
  if (src == dst) return;
  const size_t row = size_t(cfg_.n_kv_heads) * cfg_.head_dim() * kv_type_size(kv_.type());
  std::vector<char> tmp;
  for (int i = 0; i < cfg_.n_layers; ++i) {
    if (!cfg_.has_attention_path(i)) continue;
    // Each layer's own row count: a true-hybrid layer holds fewer rows than positions.
    const int n = kv_.len(i, src);
    kv_.set_len(i, dst, n);
    if (n == 0) continue;
    const size_t bytes = size_t(n) * row;
    tmp.resize(bytes);
    be_.to_host(tmp.data(), kv_.k(i, src), bytes);
    be_.to_device(kv_.k(i, dst), tmp.data(), bytes);
    be_.to_host(tmp.data(), kv_.v(i, src), bytes);
    be_.to_device(kv_.v(i, dst), tmp.data(), bytes);
  }
  rs_.copy(src, dst);
  route_.copy(src, dst);
  pos_[size_t(dst)] = pos_[size_t(src)];
}

}  // namespace hm
