// Prefix caching for hybrid models (docs/SERVER.md, "Prefix cache"). Attention K/V rows can be
// reused for any shared prefix, but a Mamba layer's state (conv window, SSM state) and a true
// layer's route state exist only at the position where they were computed. So the cache is a
// tree of fixed-size token blocks: each node holds the K/V rows its block added to every layer
// with an attention path and, where a forward stopped at the block's end, a checkpoint of the
// whole recurrent state there. A request resumes from the deepest node its prompt matches that
// has a checkpoint, and computes only the rest.
//
// Prompt chunks span many blocks (one forward per chunk, not per block: on a GPU a 2,000-token
// prompt in 64-token chunks cost 7x its single forward). They end on block boundaries, and where
// a checkpoint pays: the last boundary before the prompt's last token (what the same prompt sent
// again restores), and the branch point, the end of the deepest
// node the prompt matches beyond the checkpoint it resumed from (the next request that shares
// that prefix resumes there). Decoding passes each boundary with its state in memory. A true
// layer's K/V rows are those of the tokens routed to attention; the memory keeps their count at
// every position (KVCache::rows_at), which cuts a chunk's rows into blocks.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "runtime/memory.h"

namespace hm::server {

struct PrefixCacheStats {
  int64_t hits = 0, misses = 0;   // restore() calls that resumed from a node / from nothing
  int64_t tokens_saved = 0;       // prompt tokens restored instead of computed
  int64_t blocks = 0, bytes = 0;  // held now
  int64_t inserted = 0, evicted = 0;
};

class PrefixCache {
 public:
  // block: tokens per node (> 0); budget_bytes: the most the nodes may hold (0 = caching off).
  PrefixCache(HybridMemory& mem, const ModelConfig& c, int block, size_t budget_bytes);
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  int block() const { return block_; }
  bool enabled() const { return budget_ > 0; }

  // Resets slot, then fills it with the state after the longest cached prefix of tokens with a
  // checkpoint that still leaves at least one token to compute (a whole number of blocks).
  // Returns the number of tokens restored (0: a miss; the slot starts empty). The slot then
  // records from there. *branch (if given): the end of the deepest node the tokens match (0 when
  // no node beyond the restored one matches), where a chunk should stop to leave a checkpoint.
  int restore(int slot, const std::vector<int32_t>& tokens, int* branch = nullptr);
  // After a forward: slot holds tokens[0, mem.pos(slot)). Every block it completed since its
  // last recorded one becomes a node (or reuses the node that holds the same block) with its K/V
  // rows; the block ending exactly at the position also gets the state checkpoint.
  void record(int slot, const std::vector<int32_t>& tokens);
  // The slot's sequence is done (or reset): it stops recording.
  void release(int slot);

  const PrefixCacheStats& stats() const { return stats_; }
  // Bytes one full block takes (K/V rows of every attention layer + one state checkpoint).
  size_t block_bytes() const;

 private:
  struct Node;
  Node* child(Node* n, const int32_t* toks) const;
  // Both allocate the node's buffers and append the copies that fill them to `copies`; record()
  // drops a rejected node's copies with it and issues the rest in one copy_many at its end.
  std::unique_ptr<Node> snapshot(int slot, Node* parent, bool with_state, std::vector<Backend::CopySpan>& copies);
  void snapshot_state(Node& n, int slot, std::vector<Backend::CopySpan>& copies);
  void evict_until(size_t need);
  void set_cursor(int slot, Node* n);

  HybridMemory& mem_;
  Backend& be_;
  int block_;
  size_t budget_;
  std::vector<int> attn_layers_;
  std::vector<StatePool> state_pools_;  // what a checkpoint holds of a slot: conv, SSM, route state
  size_t kv_row_bytes_ = 0, state_bytes_ = 0;
  std::unique_ptr<Node> root_;
  std::vector<Node*> cursor_;  // per slot: the node of its last recorded block, or null
  uint64_t clock_ = 0;         // LRU time
  std::vector<Backend::CopySpan> copies_;  // record()'s and restore()'s copies, issued at once
  PrefixCacheStats stats_;
};

}  // namespace hm::server
