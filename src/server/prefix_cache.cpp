#include "server/prefix_cache.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace hm::server {

struct PrefixCache::Node {
  Node* parent = nullptr;
  int depth = 0;                   // blocks from the root: the node ends at depth * block
  std::map<std::vector<int32_t>, std::unique_ptr<Node>> kids;  // by the child block's tokens
  std::vector<int> rows, cum;      // per attention layer: K/V rows this block added, rows through it
  Buffer kv;                       // per attention layer: its K rows, then its V rows
  Buffer state;                    // one slot of each of state_pools_, in order
  size_t bytes = 0;
  uint64_t used = 0;               // LRU time
  int pins = 0;                    // slots recording from this node
  bool has_state = false;          // a checkpoint at the block's end (the root: the empty state)
};

PrefixCache::PrefixCache(HybridMemory& mem, const ModelConfig& c, int block, size_t budget_bytes)
    : mem_(mem), be_(mem.backend()), block_(block), budget_(budget_bytes), cursor_(size_t(mem.n_slots()), nullptr) {
  HM_CHECK(block > 0, "prefix cache: block size must be > 0, got ", block);
  kv_row_bytes_ = size_t(c.n_kv_heads) * size_t(c.head_dim()) * kv_type_size(mem.kv().type());
  for (int i = 0; i < c.n_layers; ++i) {
    if (c.has_attention_path(i)) attn_layers_.push_back(i);
    if (c.has_mamba_path(i)) {
      state_pools_.push_back(mem.recurrent().conv_pool(i));
      state_pools_.push_back(mem.recurrent().ssm_pool(i));
    }
    if (c.is_true(i)) {
      state_pools_.push_back(mem.route().analyzer(i));
      state_pools_.push_back(mem.route().last_mamba_pool(i));
    }
  }
  for (const StatePool& p : state_pools_) state_bytes_ += sizeof(float) * size_t(p.slot_stride);
  root_ = std::make_unique<Node>();
  root_->has_state = true;
  root_->rows.assign(attn_layers_.size(), 0);
  root_->cum.assign(attn_layers_.size(), 0);
}

PrefixCache::~PrefixCache() = default;

size_t PrefixCache::block_bytes() const {
  return attn_layers_.size() * 2 * size_t(block_) * kv_row_bytes_ + state_bytes_;
}

PrefixCache::Node* PrefixCache::child(Node* n, const int32_t* toks) const {
  auto it = n->kids.find(std::vector<int32_t>(toks, toks + block_));
  return it == n->kids.end() ? nullptr : it->second.get();
}

void PrefixCache::set_cursor(int slot, Node* n) {
  Node*& c = cursor_.at(size_t(slot));
  if (c) --c->pins;
  c = n;
  if (c) ++c->pins;
}

void PrefixCache::release(int slot) { set_cursor(slot, nullptr); }

std::unique_ptr<PrefixCache::Node> PrefixCache::snapshot(int slot, Node* parent, bool with_state,
                                                        std::vector<Backend::CopySpan>& copies) {
  auto n = std::make_unique<Node>();
  n->parent = parent;
  n->depth = parent->depth + 1;
  size_t kv_bytes = 0;
  for (size_t a = 0; a < attn_layers_.size(); ++a) {
    // The rows through the block's end: its end in a plain attention layer, what the routes gave
    // in a true layer (a many-block chunk passes several block ends in one forward).
    const int cum = mem_.kv().rows_at(attn_layers_[a], slot, n->depth * block_);
    HM_ASSERT(cum >= parent->cum[a] && cum <= mem_.kv().len(attn_layers_[a], slot));
    n->cum.push_back(cum);
    n->rows.push_back(cum - parent->cum[a]);
    kv_bytes += 2 * size_t(n->rows.back()) * kv_row_bytes_;
  }
  if (kv_bytes > 0) {
    n->kv = Buffer(be_, kv_bytes);
    char* dst = static_cast<char*>(n->kv.data());
    for (size_t a = 0; a < attn_layers_.size(); ++a) {
      const size_t off = size_t(parent->cum[a]) * kv_row_bytes_, len = size_t(n->rows[a]) * kv_row_bytes_;
      const int l = attn_layers_[a];
      copies.push_back({dst, static_cast<const char*>(mem_.kv().k(l, slot)) + off, len});
      copies.push_back({dst + len, static_cast<const char*>(mem_.kv().v(l, slot)) + off, len});
      dst += 2 * len;
    }
  }
  n->bytes = kv_bytes + sizeof(Node) + size_t(block_) * sizeof(int32_t);
  if (with_state) snapshot_state(*n, slot, copies);
  return n;
}

// The slot's recurrent state (and true layers' route state) into n, which ends at its position.
void PrefixCache::snapshot_state(Node& n, int slot, std::vector<Backend::CopySpan>& copies) {
  if (state_bytes_ > 0) {
    n.state = Buffer(be_, state_bytes_);
    char* dst = static_cast<char*>(n.state.data());
    for (const StatePool& p : state_pools_) {
      const size_t len = sizeof(float) * size_t(p.slot_stride);
      copies.push_back({dst, p.at(slot), len});
      dst += len;
    }
  }
  n.bytes += state_bytes_;
  n.has_state = true;
}

int PrefixCache::restore(int slot, const std::vector<int32_t>& tokens, int* branch) {
  release(slot);
  mem_.seq_rm(slot);
  if (branch) *branch = 0;
  if (!enabled()) return 0;
  const int n_tokens = int(tokens.size());
  Node* deepest = root_.get();  // the deepest match, then the deepest match with a checkpoint
  Node* n = root_.get();
  while ((deepest->depth + 1) * block_ <= n_tokens - 1) {
    Node* c = child(deepest, tokens.data() + size_t(deepest->depth) * block_);
    if (!c) break;
    deepest = c;
    if (c->has_state) n = c;
  }
  if (branch && deepest != n) *branch = deepest->depth * block_;
  if (n == root_.get()) {
    ++stats_.misses;
    set_cursor(slot, n);
    return 0;
  }
  std::vector<Node*> path;
  for (Node* p = n; p != root_.get(); p = p->parent) path.push_back(p);
  std::reverse(path.begin(), path.end());
  const uint64_t now = ++clock_;
  for (Node* p : path) p->used = now;
  copies_.clear();
  // K/V: each node's rows appended in order, per layer.
  for (size_t a = 0; a < attn_layers_.size(); ++a) {
    const int l = attn_layers_[a];
    char* k = static_cast<char*>(mem_.kv().k(l, slot));
    char* v = static_cast<char*>(mem_.kv().v(l, slot));
    for (Node* p : path) {
      const char* src = static_cast<const char*>(p->kv.data());
      for (size_t b = 0; b < a; ++b) src += 2 * size_t(p->rows[b]) * kv_row_bytes_;
      const size_t off = size_t(p->cum[a] - p->rows[a]) * kv_row_bytes_, len = size_t(p->rows[a]) * kv_row_bytes_;
      if (len == 0) continue;
      copies_.push_back({k + off, src, len});
      copies_.push_back({v + off, src + len, len});
    }
    mem_.kv().set_len(l, slot, n->cum[a]);
  }
  // The recurrent state as it was at the end of the deepest block.
  if (state_bytes_ > 0) {
    const char* src = static_cast<const char*>(n->state.data());
    for (const StatePool& p : state_pools_) {
      const size_t len = sizeof(float) * size_t(p.slot_stride);
      copies_.push_back({p.at(slot), src, len});
      src += len;
    }
  }
  be_.copy_many(copies_);
  const int restored = n->depth * block_;
  mem_.advance(slot, restored);
  mem_.kv().reset_rows_at(slot, restored);
  ++stats_.hits;
  stats_.tokens_saved += restored;
  set_cursor(slot, n);
  return restored;
}

void PrefixCache::record(int slot, const std::vector<int32_t>& tokens) {
  const int pos = mem_.pos(slot);
  HM_ASSERT(int(tokens.size()) >= pos);
  copies_.clear();
  for (Node* c = cursor_.at(size_t(slot)); c != nullptr && (c->depth + 1) * block_ <= pos;
       c = cursor_.at(size_t(slot))) {
    const bool at_end = (c->depth + 1) * block_ == pos;
    const int32_t* toks = tokens.data() + size_t(c->depth) * block_;
    if (Node* have = child(c, toks)) {
      have->used = ++clock_;
      set_cursor(slot, have);  // pinned: the eviction below cannot take it
      if (at_end && !have->has_state) {
        const size_t before = have->bytes, need = state_bytes_;
        evict_until(need);
        if (size_t(stats_.bytes) + need > budget_) {  // no room for the checkpoint
          release(slot);
          break;
        }
        snapshot_state(*have, slot, copies_);
        stats_.bytes += int64_t(have->bytes - before);
      }
      continue;
    }
    const size_t kept = copies_.size();
    std::unique_ptr<Node> n = snapshot(slot, c, at_end, copies_);
    evict_until(n->bytes);
    if (size_t(stats_.bytes) + n->bytes > budget_) {  // the budget cannot hold it: n and its copies go
      copies_.resize(kept);
      release(slot);
      break;
    }
    n->used = ++clock_;
    Node* raw = n.get();
    stats_.bytes += int64_t(n->bytes);
    ++stats_.blocks;
    ++stats_.inserted;
    c->kids.emplace(std::vector<int32_t>(toks, toks + block_), std::move(n));
    set_cursor(slot, raw);
  }
  // The kept nodes' copies; none of those nodes can have been evicted (each is the slot's
  // pinned cursor or above it).
  be_.copy_many(copies_);
}

void PrefixCache::evict_until(size_t need) {
  while (size_t(stats_.bytes) + need > budget_) {
    // The least recently used leaf no slot records from (inner nodes hold their children's
    // prefix; they become leaves as those go).
    Node* victim = nullptr;
    std::vector<Node*> stack{root_.get()};
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      for (auto& [k, kid] : n->kids) stack.push_back(kid.get());
      if (n != root_.get() && n->kids.empty() && n->pins == 0 && (!victim || n->used < victim->used)) victim = n;
    }
    if (!victim) return;
    stats_.bytes -= int64_t(victim->bytes);
    --stats_.blocks;
    ++stats_.evicted;
    Node* parent = victim->parent;
    for (auto it = parent->kids.begin(); it != parent->kids.end(); ++it)
      if (it->second.get() == victim) {
        parent->kids.erase(it);
        break;
      }
  }
}

}  // namespace hm::server
