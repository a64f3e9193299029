#include "runtime/memory.h"

#include <algorithm>

#include "core/error.h"

namespace hm {

KvType kv_type_from_name(const std::string& name) {
  if (name == "f32") return KvType::F32;
  if (name == "f16") return KvType::F16;
  if (name == "bf16") return KvType::BF16;
  throw Error(detail::cat("kv cache type must be f32, f16 or bf16, got '", name, "'"));
}

size_t kv_type_size(KvType t) { return dtype_size(t); }

KVCache::KVCache(Backend& be, const ModelConfig& c, int n_slots, int max_ctx, KvType type)
    : type_(type), n_slots_(n_slots), max_ctx_(max_ctx), row_(c.n_kv_heads * c.head_dim()) {
  HM_CHECK(n_slots > 0, "memory: number of sequences must be > 0, got ", n_slots);
  HM_CHECK(max_ctx > 0, "memory: context size must be > 0, got ", max_ctx);
  int n_attn = 0;
  for (int i = 0; i < c.n_layers; ++i) {
    layer_index_.push_back(c.has_attention_path(i) ? n_attn++ : -1);
    if (c.has_attention_path(i)) routed_.push_back(c.is_true(i));
  }
  if (n_attn > 0)
    HM_CHECK(be.supports_kv(type), "memory: the ", be.name(), " backend has no ", compute_dtype_name(type),
             " KV cache");
  // Never zeroed: only rows below a sequence's length are ever read.
  const size_t bytes = size_t(n_slots) * size_t(max_ctx) * size_t(row_) * dtype_size(type);
  for (int a = 0; a < n_attn; ++a) {
    k_.emplace_back(be, bytes);
    v_.emplace_back(be, bytes);
  }
  len_.assign(size_t(n_attn) * n_slots, 0);
  rows_at_.assign(len_.size(), RowsAt{});
  for (size_t i = 0; i < rows_at_.size(); ++i)
    if (routed_[i / size_t(n_slots)]) rows_at_[i].rows.reserve(size_t(max_ctx) + 1);  // never grown
}

size_t KVCache::index(int layer, int slot) const {
  const int a = layer_index_.at(size_t(layer));
  HM_ASSERT(a >= 0 && slot >= 0 && slot < n_slots_);
  return size_t(a) * n_slots_ + slot;
}

KvPool KVCache::pool(int layer) const {
  const int a = layer_index_.at(size_t(layer));
  HM_ASSERT(a >= 0);
  KvPool p;
  p.k = k_[size_t(a)].data();
  p.v = v_[size_t(a)].data();
  p.dtype = type_;
  p.n_slots = n_slots_;
  p.max_ctx = max_ctx_;
  p.row = row_;
  p.slot_stride = int64_t(max_ctx_) * row_;
  return p;
}

void KVCache::clear(int slot) {
  HM_ASSERT(slot >= 0 && slot < n_slots_);
  for (size_t a = 0; a * n_slots_ < len_.size(); ++a) {
    len_[a * n_slots_ + slot] = 0;
    RowsAt& r = rows_at_[a * n_slots_ + slot];
    r.from = 0;
    r.rows.assign(1, 0);
  }
}

int KVCache::rows_at(int layer, int slot, int pos) const {
  const size_t i = index(layer, slot);
  if (!routed_[size_t(layer_index_[size_t(layer)])]) return pos;
  const RowsAt& r = rows_at_[i];
  HM_ASSERT(pos >= r.from && size_t(pos - r.from) < r.rows.size());
  return r.rows[size_t(pos - r.from)];
}

void KVCache::push_rows(int layer, int slot, int rows) {
  RowsAt& r = rows_at_[index(layer, slot)];
  HM_ASSERT(rows >= r.rows.back() && r.rows.size() <= size_t(max_ctx_));
  r.rows.push_back(rows);
}

void KVCache::reset_rows_at(int slot, int pos) {
  for (size_t a = 0; a * n_slots_ < len_.size(); ++a) {
    const size_t i = a * n_slots_ + size_t(slot);
    rows_at_[i].from = pos;
    rows_at_[i].rows.assign(1, len_[i]);
  }
}

void KVCache::copy_rows_at(int src, int dst) {
  for (size_t a = 0; a * n_slots_ < len_.size(); ++a) {
    const RowsAt& from = rows_at_[a * n_slots_ + size_t(src)];
    RowsAt& to = rows_at_[a * n_slots_ + size_t(dst)];
    to.from = from.from;
    to.rows.assign(from.rows.begin(), from.rows.end());  // within the reserved capacity
  }
}

size_t KVCache::bytes_reserved() const {
  size_t n = 0;
  for (const auto& b : k_) n += b.bytes();
  for (const auto& b : v_) n += b.bytes();
  for (size_t i = 0; i < rows_at_.size(); ++i)
    if (routed_[i / size_t(n_slots_)]) n += rows_at_[i].rows.capacity() * sizeof(int);
  return n + len_.size() * sizeof(int);
}

RecurrentState::RecurrentState(Backend& be, const ModelConfig& c, int n_slots)
    : be_(be), n_slots_(n_slots), ssm_n_(c.d_inner() * c.d_state) {
  int n_mamba = 0;
  for (int i = 0; i < c.n_layers; ++i) {
    layer_index_.push_back(c.has_mamba_path(i) ? n_mamba++ : -1);
    if (c.has_mamba_path(i)) conv_n_.push_back(c.conv_channels(i) * (c.d_conv - 1));
  }
  for (int m = 0; m < n_mamba; ++m) {
    conv_.emplace_back(be_, sizeof(float) * size_t(conv_n_[size_t(m)]) * n_slots);
    ssm_.emplace_back(be_, sizeof(float) * size_t(ssm_n_) * n_slots);
    be_.memzero(conv_.back().data(), conv_.back().bytes());
    be_.memzero(ssm_.back().data(), ssm_.back().bytes());
  }
}

int RecurrentState::index(int layer) const {
  const int m = layer_index_.at(size_t(layer));
  HM_ASSERT(m >= 0);
  return m;
}

StatePool RecurrentState::conv_pool(int layer) const {
  const int m = index(layer);
  return {conv_[size_t(m)].f32(), n_slots_, int64_t(conv_n_[size_t(m)])};
}

StatePool RecurrentState::ssm_pool(int layer) const {
  return {ssm_[size_t(index(layer))].f32(), n_slots_, int64_t(ssm_n_)};
}

void RecurrentState::clear(int slot) {
  HM_ASSERT(slot >= 0 && slot < n_slots_);
  for (size_t m = 0; m < conv_.size(); ++m) {
    be_.memzero(conv_[m].f32() + int64_t(slot) * conv_n_[m], sizeof(float) * size_t(conv_n_[m]));
    be_.memzero(ssm_[m].f32() + int64_t(slot) * ssm_n_, sizeof(float) * size_t(ssm_n_));
  }
}

void RecurrentState::copy(int src, int dst) {
  for (size_t m = 0; m < conv_.size(); ++m) {
    be_.copy(conv_[m].f32() + int64_t(dst) * conv_n_[m], conv_[m].f32() + int64_t(src) * conv_n_[m],
             sizeof(float) * size_t(conv_n_[m]));
    be_.copy(ssm_[m].f32() + int64_t(dst) * ssm_n_, ssm_[m].f32() + int64_t(src) * ssm_n_,
             sizeof(float) * size_t(ssm_n_));
  }
}

size_t RecurrentState::bytes_reserved() const {
  size_t floats = ssm_.size() * size_t(ssm_n_);
  for (int n : conv_n_) floats += size_t(n);
  return floats * sizeof(float) * size_t(n_slots_);
}

RouteState::RouteState(Backend& be, const ModelConfig& c, int n_slots)
    : be_(be), n_slots_(n_slots), d_(c.d_model) {
  int n_true = 0;
  for (int i = 0; i < c.n_layers; ++i) layer_index_.push_back(c.is_true(i) ? n_true++ : -1);
  for (int t = 0; t < n_true; ++t) {
    an_.emplace_back(be_, sizeof(float) * size_t(d_ + 1) * n_slots);
    x_.emplace_back(be_, sizeof(float) * size_t(d_) * n_slots);
    be_.memzero(an_.back().data(), an_.back().bytes());
    be_.memzero(x_.back().data(), x_.back().bytes());
  }
}

int RouteState::index(int layer) const {
  const int t = layer_index_.at(size_t(layer));
  HM_ASSERT(t >= 0);
  return t;
}

std::array<StatePool, 2> RouteState::pools(size_t t) const {
  return {StatePool{an_[t].f32(), n_slots_, int64_t(d_) + 1}, StatePool{x_[t].f32(), n_slots_, int64_t(d_)}};
}

StatePool RouteState::analyzer(int layer) const { return pools(size_t(index(layer)))[0]; }

Tensor RouteState::last_mamba(int layer, DType t) const {
  return {x_[size_t(index(layer))].data(), t, n_slots_, d_, int64_t(d_) * 4 / int64_t(dtype_size(t))};
}

StatePool RouteState::last_mamba_pool(int layer) const { return pools(size_t(index(layer)))[1]; }

void RouteState::clear(int slot) {
  HM_ASSERT(slot >= 0 && slot < n_slots_);
  for (size_t t = 0; t < x_.size(); ++t) {
    for (const StatePool& p : pools(t)) be_.memzero(p.at(slot), sizeof(float) * size_t(p.slot_stride));
  }
}

void RouteState::copy(int src, int dst) {
  for (size_t t = 0; t < x_.size(); ++t) {
    for (const StatePool& p : pools(t)) be_.copy(p.at(dst), p.at(src), sizeof(float) * size_t(p.slot_stride));
  }
}

size_t RouteState::bytes_reserved() const {
  size_t n = 0;
  for (const auto& b : an_) n += b.bytes();
  for (const auto& b : x_) n += b.bytes();
  return n;
}

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
  for (int i = 0; i < cfg_.n_layers; ++i) {
    if (!cfg_.has_attention_path(i)) continue;
    // Each layer's own row count: a true-hybrid layer holds fewer rows than positions.
    const int n = kv_.len(i, src);
    kv_.set_len(i, dst, n);
    if (n == 0) continue;
    be_.copy(kv_.k(i, dst), kv_.k(i, src), size_t(n) * row);
    be_.copy(kv_.v(i, dst), kv_.v(i, src), size_t(n) * row);
  }
  kv_.copy_rows_at(src, dst);
  rs_.copy(src, dst);
  route_.copy(src, dst);
  pos_[size_t(dst)] = pos_[size_t(src)];
}

}  // namespace hm
