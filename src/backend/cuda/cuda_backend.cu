// The CUDA backend: the Backend interface (backend/backend.h) on the kernels of
// src/kernels/cuda/ (docs/CUDA.md). Every op checks its shapes and types on the host (an
// hm::Error naming the op and the values), converts the views to the kernels' pointers and
// leading dimensions, and enqueues on the backend's one stream without waiting: only to_host
// and synchronize() wait. Each op dispatches on Tensor::dtype to the float, bf16 or f16
// instantiation; decode batches (every sequence one row) take the one-step kernels.
#include <algorithm>
#include <cstdlib>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/id_rows.h"
#include "backend/train_checks.h"
#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/decode.h"
#include "kernels/cuda/grad.h"
#include "kernels/cuda/mamba_grad.h"
#include "kernels/cuda/linear.h"
#include "kernels/cuda/rows.h"
#include "kernels/cuda/skinny.h"
#include "kernels/ref/router_ref.h"  // kRouterFeatures

namespace hm {
namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;

// Calls f with a null T* for the element type of t (T = float, __nv_bfloat16, __half).
template <class F>
void dispatch(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(static_cast<float*>(nullptr)); return;
    case DType::BF16: f(static_cast<bf16*>(nullptr)); return;
    case DType::F16: f(static_cast<f16*>(nullptr)); return;
    default: break;
  }
  throw Error(detail::cat("cuda: ", dtype_name(t), " is not a compute type (f32, bf16 or f16)"));
}
template <class P> using elem_t = std::remove_pointer_t<P>;

template <class T> T* ptr(const Tensor& t) { return static_cast<T*>(t.data); }

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    default: break;
  }
  throw Error(detail::cat("cuda: ", dtype_name(t), " is not a compute type (f32, bf16 or f16)"));
}

// ---- Host-side checks (cheap: shapes, types, the Ragged's host arrays) ----

// `t` is a rows x cols view: leading dimension at least cols (the kernels take int strides),
// and memory behind it when it has elements.
void check_view(const char* op, const char* name, const Tensor& t, int rows, int cols) {
  HM_CHECK(t.rows == rows && t.cols == cols, "cuda ", op, ": ", name, " is [", t.rows, ", ", t.cols,
           "], expected [", rows, ", ", cols, "]");
  HM_CHECK(t.ld >= t.cols && t.ld <= INT_MAX, "cuda ", op, ": ", name, " has row stride ", t.ld, " for ",
           t.cols, " columns");
  HM_CHECK(t.data != nullptr || rows == 0 || cols == 0, "cuda ", op, ": ", name, " has no data");
}
// `t` holds n contiguous elements (a weight vector).
void check_vec(const char* op, const char* name, const Tensor& t, int n) {
  HM_CHECK(int64_t(t.rows) * t.cols == n && (t.rows <= 1 || t.ld == t.cols), "cuda ", op, ": ", name,
           " must be a contiguous vector of ", n, " elements, got [", t.rows, ", ", t.cols, "] stride ", t.ld);
  HM_CHECK(t.data != nullptr || n == 0, "cuda ", op, ": ", name, " has no data");
}
// The kernels of rmsnorm and embedding take dense rows.
void check_dense(const char* op, const char* name, const Tensor& t) {
  HM_CHECK(t.rows <= 1 || t.ld == t.cols, "cuda ", op, ": ", name, " must be dense (row stride ", t.ld,
           " != cols ", t.cols, ")");
}
void check_type(const char* op, const char* name, const Tensor& t, DType want) {
  HM_CHECK(t.dtype == want, "cuda ", op, ": ", name, " is ", compute_dtype_name(t.dtype), ", expected ", compute_dtype_name(want));
}
// A gradient the training ops write in the activations' type `act` or in float.
void check_grad_type(const char* op, const char* name, const Tensor& t, DType act) {
  HM_CHECK(t.dtype == act || t.dtype == DType::F32, "cuda ", op, ": ", name, " is ", compute_dtype_name(t.dtype),
           ", expected ", compute_dtype_name(act), " or f32");
}
// Calls f with a null G* for a gradient of type g: float, or T itself (check_grad_type first).
template <class T, class F>
void dispatch_grad(DType g, F&& f) {
  if (g == DType::F32) f(static_cast<float*>(nullptr));
  else f(static_cast<T*>(nullptr));
}
using Named = std::pair<const char*, Tensor>;
// The attention training ops' views: query-side [n_tokens, H hd] and kv-side [n_tokens, G hd],
// all of type t; lse [n_tokens, H] float.
void check_attention(const char* op, DType t, std::initializer_list<Named> qside, std::initializer_list<Named> kvside,
                     const Tensor& lse, int H, int G, int hd, const Ragged& rg) {
  const int n = rg.n_tokens();
  for (const auto& [name, v] : qside) {
    check_view(op, name, v, n, H * hd);
    check_type(op, name, v, t);
  }
  for (const auto& [name, v] : kvside) {
    check_view(op, name, v, n, G * hd);
    check_type(op, name, v, t);
  }
  check_view(op, "lse", lse, n, H);
  check_type(op, "lse", lse, DType::F32);
  HM_CHECK(rg.nseq() == 0 || rg.d_cu() != nullptr, "cuda ", op, ": the Ragged batch was not uploaded");
}
void check_kv_type(const char* op, DType t) {
  HM_CHECK(t == DType::F32 || t == DType::BF16 || t == DType::F16, "cuda ", op, ": the KV cache must be f32, bf16 or f16, got ",
           compute_dtype_name(t));
}

// The Ragged's device arrays exist and its slots index the pool.
void check_ragged(const char* op, const Ragged& rg, int n_slots) {
  HM_CHECK(rg.nseq() == 0 || rg.d_cu() != nullptr, "cuda ", op, ": the Ragged batch was not uploaded");
  for (int s = 0; s < rg.nseq(); ++s)
    HM_CHECK(rg.slot(s) >= 0 && rg.slot(s) < n_slots, "cuda ", op, ": sequence ", s, " has slot ", rg.slot(s),
             ", the pool has ", n_slots);
}
void check_state(const char* op, const StatePool& st, int64_t per_slot) {
  HM_CHECK(st.slot_stride == per_slot, "cuda ", op, ": the state pool's slot stride is ", st.slot_stride,
           ", the kernels need ", per_slot, " (dense slots)");
  HM_CHECK(st.base != nullptr || st.n_slots == 0, "cuda ", op, ": the state pool has no data");
}

// What selective_scan and dt_scan share: y, x, z [n_tokens, E], B and C [n_tokens, N] on one
// row stride, dt_bias and Dskip [E], A, the element types, the dense state and the slots.
void check_scan(const char* op, Tensor y, const StatePool& st, Tensor x, Tensor dt_bias, const float* A, Tensor B,
                Tensor C, Tensor Dskip, Tensor z, const Ragged& rg) {
  const int E = x.cols, N = B.cols, T_ = rg.n_tokens();
  HM_CHECK(N >= 1 && N <= cuda::kMaxState, "cuda ", op, ": d_state must be in [1, ", cuda::kMaxState, "], got ", N);
  check_view(op, "x", x, T_, E);
  check_view(op, "z", z, T_, E);
  check_view(op, "y", y, T_, E);
  check_view(op, "B", B, T_, N);
  check_view(op, "C", C, T_, N);
  HM_CHECK(B.ld == C.ld, "cuda ", op, ": B and C must share a row stride (", B.ld, " vs ", C.ld, ")");
  check_vec(op, "dt_bias", dt_bias, E);
  check_vec(op, "Dskip", Dskip, E);
  HM_CHECK(A != nullptr || E == 0, "cuda ", op, ": A is null");
  for (const auto& [name, t] : {std::pair{"z", &z}, std::pair{"y", &y}, std::pair{"B", &B}, std::pair{"C", &C},
                                std::pair{"dt_bias", &dt_bias}, std::pair{"Dskip", &Dskip}})
    check_type(op, name, *t, x.dtype);
  check_state(op, st, int64_t(E) * N);
  check_ragged(op, rg, st.n_slots);
}

cuda::RaggedBatch batch(const Ragged& rg) {
  cuda::RaggedBatch rb;
  rb.cu_seqlens = rg.d_cu();
  rb.slots = rg.d_slots();
  rb.pos0 = rg.d_pos0();
  rb.nseq = rg.nseq();
  rb.n_tokens = rg.n_tokens();
  rb.max_len = rg.max_len();
  return rb;
}
// Every sequence is one row, at row s: the one-step kernels apply.
bool is_decode(const Ragged& rg) { return rg.max_len() == 1 && rg.n_tokens() == rg.nseq(); }

// The decode kernels of kernels/cuda/decode.h (GEMV, fused Mamba input stage and dt scan);
// HM_CUDA_GEMV=0 keeps every projection on cuBLASLt and every op unfused (the A/B switch).
// The most rows the backend hands to the GEMV and the fused decode stages (the norm, the conv
// step, a bridge's scale inside it). At one row the row kernel beats cuBLASLt (H200: 130M decode
// 1,491 -> 2,269 tok/s); the CUDA-core kernel at 2-8 rows loses (1.4B at 4 rows 2,029 -> 1,195;
// seed at 8 rows -23%, stop 43), and so does the tensor-core one at 16 (seed -15%). So 2..8 rows
// go only to the row kernel's multi-row form (x staged as floats: gemv_rows_fits), and only while
// its float FMAs, m * n * k, stay within kGemvRowsMaxWork. Stop 44 (H100, all of a model's
// projections on it against none): seed 2/4/8 rows +47/+33/+23% (largest m*n*k 8.4M), 130M 4 rows
// +17% (9.4M); 130M 8 rows -6% (18.9M), 1.4B 4 rows -8% (34-67M), seed 16 rows -12%.
constexpr int kGemvRows = 8;
constexpr int64_t kGemvRowsMaxWork = int64_t(10) << 20;

int gemv_rows_default() {  // HM_CUDA_GEMV_ROWS=N overrides (A/B runs: small models at batch 2-32)
  const char* v = std::getenv("HM_CUDA_GEMV_ROWS");
  return v != nullptr && std::atoi(v) >= 0 ? std::min(std::atoi(v), cuda::kGemvMaxRows) : kGemvRows;
}

// Whether linear_bridge takes a folded bridge (one GEMM, then bridge_add) at rows the bridge's
// GEMV does not take: on unless HM_CUDA_FOLD_BRIDGE=0 (the A/B switch).
bool fold_bridge_default() {
  const char* v = std::getenv("HM_CUDA_FOLD_BRIDGE");
  return v == nullptr || std::atoi(v) != 0;
}

// Linears of 2..kSkinnyRows rows (decode steps of 2-64 sequences) can run on the skinny GEMM
// (kernels/cuda/skinny.h): W streamed once for all rows, split-K reduced inside the launch, and
// every row's bits independent of the batch (issue 16). Off by default: on the H200
// (bench/results/h200-2026-12-04b) it beat cuBLASLt 1.4-2.2x alone on the 1.4B shape's x_proj and
// dt_proj (W of 1.0-1.3 MB) but lost 0.5-0.8x on in_proj, out_proj and the LM head (W of 16.8 MB
// and more: too few blocks in flight to stream W at HBM rate), and with only the small weights
// on it a whole decode step at batch 4 was still slower (1.4B 1.97 -> 2.07 ms, seed 0.35 -> 0.38
// ms). HM_CUDA_SKINNY=1 turns it on for 2-64 rows, =2 also for one row (set_skinny_min_rows).
// It takes 16-bit weights of at most 4 MB (HM_CUDA_SKINNY_MAX_MB=N for A/B runs with other
// bounds); other shapes stay on cuBLASLt.
constexpr int kSkinnyRows = cuda::kSkinnyMaxRows;
size_t skinny_max_weight_bytes() {
  static const size_t b = [] {
    const char* v = std::getenv("HM_CUDA_SKINNY_MAX_MB");
    const long mb = v != nullptr ? std::atol(v) : 4;
    return size_t(mb > 0 ? mb : 4) << 20;
  }();
  return b;
}

// The skinny GEMM's smallest row count, from HM_CUDA_SKINNY: 0 (off) unless it says 1 or 2.
int skinny_min_rows_default() {
  const char* v = std::getenv("HM_CUDA_SKINNY");
  if (v != nullptr && std::string(v) == "1") return 2;
  if (v != nullptr && std::string(v) == "2") return 1;
  return 0;
}

// cross_entropy_head's logits (and dlogits) of one block of rows stay within this. Each block's
// dW += dz^T hn reads and writes the whole float [V, D] gradient, so small blocks multiply that
// traffic: at 128 MB a Mamba-1 130M step (8 x 2048 tokens, V 50280) ran 37 blocks, 11 GB of dW
// traffic and 15.4 ms in the head on the H200 (docs/TRAINING.md's profile); 1 GiB takes 5.
// HM_CUDA_HEAD_BLOCK_BYTES=N overrides (tests use it to run many blocks on small shapes).
constexpr size_t kHeadBlockBytes = size_t(1) << 30;

// cross_entropy_head's logits are of the compute type unless HM_CUDA_HEAD_LOGITS=f32.
bool head_logits_in_type() {
  const char* v = std::getenv("HM_CUDA_HEAD_LOGITS");
  return v == nullptr || std::string(v) != "f32";
}

size_t head_block_bytes() {
  const char* v = std::getenv("HM_CUDA_HEAD_BLOCK_BYTES");
  return v != nullptr && std::atoll(v) > 0 ? size_t(std::atoll(v)) : kHeadBlockBytes;
}

// When a decode step runs dt_proj inside the scan step (dt_scan). Each (sequence, channel)
// re-reads its row of dt_proj, so the weight is read once per sequence (from L2 after the
// first); otherwise dt_proj is one cuBLASLt GEMM that reads it once, a launch more. Fused at one
// sequence, and while sequences x dt_proj's bytes stay within kDtScanBytes. Stop 47 on an H100
// (bench/results/gpu-2026-12-07-stop47/): fused at every count, the seed (dt_proj 64 KB) gained
// at 16 sequences (1 MB) and lost 8% at 64 (4 MB), the 130M (147 KB) lost 1-3% at 16 and 15% at
// 64 (callA); this rule against "one sequence" (callD): seed +8.7% at 8 and +4.1% at 16, 130M
// +8.4% at 8. HM_CUDA_DT_SCAN_SEQS=N replaces the rule by "at most N sequences" (A/B runs).
constexpr size_t kDtScanBytes = size_t(5) << 18;  // 1.25 MB

int dt_scan_seqs_default() {  // -1: the byte rule
  const char* v = std::getenv("HM_CUDA_DT_SCAN_SEQS");
  return v != nullptr && std::atoi(v) >= 0 ? std::atoi(v) : -1;
}

// The pre-norm's 1 / rms applied in the conv step after in_proj (mamba_in with unit_norm, decode
// steps beyond the GEMV's rows); HM_CUDA_NORM_AFTER=0 runs the RMSNorm launch instead (A/B runs).
bool norm_after_default() {
  const char* v = std::getenv("HM_CUDA_NORM_AFTER");
  return v == nullptr || std::string(v) != "0";
}

// Mamba-2's decode step in the GEMVs (mamba_in at conv_col0 > 0, gated_norm_linear);
// HM_CUDA_MAMBA2_STEP=0 runs their plain ops instead (A/B runs).
bool mamba2_step_default() {
  const char* v = std::getenv("HM_CUDA_MAMBA2_STEP");
  return v == nullptr || std::string(v) != "0";
}

bool decode_kernels_default() {
  const char* v = std::getenv("HM_CUDA_GEMV");
  return v == nullptr || std::string(v) != "0";
}

class CudaBackendImpl final : public CudaBackend {
 public:
  CudaBackendImpl() {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) cudaGetLastError();
    HM_CHECK(e == cudaSuccess && n > 0, "cuda: no usable CUDA device (cudaGetDeviceCount: ",
             e == cudaSuccess ? "0 devices" : cudaGetErrorString(e), ")");
    HM_CUDA_OK(cudaGetDevice(&dev_), "cudaGetDevice");
    HM_CUDA_OK(cudaSetDevice(dev_), "cudaSetDevice");
    HM_CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    // Blocks come from the device's stream-ordered pool, which keeps what is freed (threshold:
    // never release): a prefix-cache node or a step's scratch costs no cudaMalloc, and a free
    // does not wait for the stream.
    HM_CUDA_OK(cudaDeviceGetDefaultMemPool(&pool_, dev_), "cudaDeviceGetDefaultMemPool");
    uint64_t keep = UINT64_MAX;
    HM_CUDA_OK(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep),
               "cudaMemPoolSetAttribute(release threshold)");
    try {
      gemm_ = std::make_unique<cuda::Gemm>();
    } catch (...) {
      cudaStreamDestroy(stream_);
      throw;
    }
  }
  ~CudaBackendImpl() override {
    cudaStreamSynchronize(stream_);
    gemm_.reset();
    blas_.reset();
    for (void* p : deferred_) cudaFreeAsync(p, stream_);
    cudaFreeAsync(ws_, stream_);
    for (void* p : retired_) cudaFreeAsync(p, stream_);
    cudaStreamSynchronize(stream_);
    cudaMemPoolTrimTo(pool_, 0);
    cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::CUDA; }
  std::string name() const override { return "cuda"; }
  bool supports(DType t) const override { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }
  // F32 caches run a plain float attention kernel (the f32 model's exact path, not a fast one).
  bool supports_kv(DType t) const override { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }
  DType default_dtype() const override { return DType::BF16; }

  cudaStream_t stream() const override { return stream_; }
  size_t workspace_bytes() const override { return ws_bytes_; }
  void set_linear_fallback_only(bool on) override {
    gemm_->set_use_lt(!on);
    fallback_only_ = on;
  }
  void set_decode_kernels(bool on) override { decode_kernels_ = on; }
  void set_dt_scan_seqs(int n) override { dt_scan_seqs_ = n; }
  void set_skinny_min_rows(int rows) override { skinny_min_rows_ = rows; }
  // Batch invariance: one GEMM algorithm per shape whatever m, and none of the kernels that
  // only a pure decode batch (or one row) runs: GEMV, the fused Mamba input stage and dt scan,
  // the one-step conv and scan, split-KV attention. The prefill kernels then serve every row,
  // the scan walks each sequence's tokens in order from its slot's state (no chunking).
  void set_batch_invariant(bool on) override {
    inv_ = on;
    gemm_->set_invariant(on);
  }
  bool batch_invariant() const override { return inv_; }
  // The fallback-only test mode means cublasGemmEx for every linear, so no GEMV either.
  bool decode_kernels_on() const { return decode_kernels_ && !fallback_only_ && !inv_; }
  // A pure decode batch on its one-step kernels (not in batch-invariant mode).
  bool decode_step(const Ragged& rg) const { return !inv_ && is_decode(rg); }
  void reserve_workspace(size_t bytes) override {
    if (bytes <= ws_bytes_) return;
    HM_CHECK(!capturing(), "cuda: the op workspace must grow to ", bytes, " bytes (holds ", ws_bytes_,
             ") while the stream is being captured; call reserve_workspace before the capture");
    // Grown geometrically; the old block is kept until the backend goes, since a captured graph
    // may still name it.
    const size_t want = std::max(bytes, 2 * ws_bytes_);
    void* p = alloc(want);
    if (ws_) retired_.push_back(ws_);
    ws_ = p;
    ws_bytes_ = want;
  }

  // ---- Memory ----
  // Stream-ordered: the block may be used by ops queued after this call (every op runs on
  // stream_). Not while capturing: the pool's allocation would become a node of the graph.
  void* alloc(size_t bytes) override {
    if (bytes == 0) return nullptr;
    HM_CHECK(!capturing(), "cuda: alloc of ", bytes, " bytes while the stream is being captured into a graph");
    free_deferred();
    void* p = nullptr;
    cudaError_t e = cudaMallocAsync(&p, bytes, stream_);
    if (e != cudaSuccess) {
      cudaGetLastError();  // out of memory is not sticky: clear it
      // Hand the pool's idle blocks back to the device (cuBLAS and other pools may hold the
      // rest), then try once more.
      cudaStreamSynchronize(stream_);
      cudaMemPoolTrimTo(pool_, 0);
      e = cudaMallocAsync(&p, bytes, stream_);
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw OutOfMemory(detail::cat("cuda: cudaMallocAsync of ", bytes, " bytes failed (", cudaGetErrorString(e),
                              "); ", free_b, " of ", total_b, " bytes free on device ", dev_, ", ", live_,
                              " held by this backend"));
    }
    sizes_[p] = bytes;
    live_ += bytes;
    peak_ = std::max(peak_, live_);
    return p;
  }
  // Stream-ordered: the block returns to the pool after every op already queued, so the host
  // does not wait. During a capture it is held until the capture ends. Never throws (Buffer's
  // destructor calls it).
  void free(void* p) override {
    if (!p) return;
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone) {
      deferred_.push_back(p);
    } else {
      free_deferred();
      cudaFreeAsync(p, stream_);
    }
    if (auto it = sizes_.find(p); it != sizes_.end()) {
      live_ -= it->second;
      sizes_.erase(it);
    }
  }
  size_t allocated_bytes() const override { return live_; }
  size_t peak_allocated_bytes() const override { return peak_; }
  void reset_peak() override { peak_ = live_; }
  // From pageable host memory the copy returns once the source is staged, so the caller may
  // reuse it; ordered after every op already queued.
  void to_device(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    HM_CUDA_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "to_device");
  }
  void to_host(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    HM_CUDA_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "to_host");
    HM_CUDA_OK(cudaStreamSynchronize(stream_), "to_host (synchronize)");
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    HM_CUDA_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
  }
  // The spans' list goes to the device as a kernel parameter (rows.h): a restore's ~200 copies
  // are 2 launches, not ~200 cudaMemcpyAsync calls of several us of host time each.
  void copy_many(const std::vector<CopySpan>& spans) override {
    span_list_.clear();
    for (const CopySpan& s : spans)
      if (s.bytes > 0) span_list_.push_back({s.dst, s.src, s.bytes});
    cuda::copy_spans(span_list_.data(), int(span_list_.size()), stream_);
  }
  void memzero(void* p, size_t bytes) override {
    if (bytes == 0) return;
    HM_CUDA_OK(cudaMemsetAsync(p, 0, bytes, stream_), "memzero");
  }
  // Also where an earlier kernel's asynchronous fault surfaces, as an hm::Error.
  void synchronize() override { HM_CUDA_OK(cudaStreamSynchronize(stream_), "synchronize"); }

  // ---- Graphs ----
  bool supports_graphs() const override { return true; }
  void begin_capture() override {
    HM_CUDA_OK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  }
  std::shared_ptr<void> end_capture() override {
    cudaGraph_t g = nullptr;
    HM_CUDA_OK(cudaStreamEndCapture(stream_, &g), "cudaStreamEndCapture");
    free_deferred();
    cudaGraphExec_t ex = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&ex, g, 0);
    cudaGraphDestroy(g);
    HM_CUDA_OK(e, "cudaGraphInstantiate");
    return std::shared_ptr<void>(static_cast<void*>(ex), [](void* p) {
      if (p) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(p));
    });
  }
  void replay(const std::shared_ptr<void>& graph) override {
    HM_CUDA_OK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph.get()), stream_), "cudaGraphLaunch");
  }

  // ---- Ops ----
  void rmsnorm(Tensor out, Tensor x, Tensor w, float eps) override {
    const char* op = "rmsnorm";
    const int n = x.rows, d = x.cols;
    check_view(op, "x", x, n, d);
    check_view(op, "out", out, n, d);
    check_vec(op, "w", w, d);
    check_dense(op, "x", x);
    check_dense(op, "out", out);
    check_type(op, "out", out, x.dtype);
    check_type(op, "w", w, x.dtype);
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::rmsnorm<T>(ptr<T>(out), ptr<T>(x), ptr<T>(w), n, d, eps, stream_);
    });
  }

  void linear(Tensor y, Tensor x, Tensor W, bool accumulate) override {
    const char* op = "linear";
    const int m = x.rows, k = x.cols, n = W.rows;
    HM_CHECK(!is_packed(W.dtype), "cuda linear: W is ", compute_dtype_name(W.dtype),
             ": packed weights run on the CPU only (compute in bf16 or f16 on cuda: --dtype)");
    check_view(op, "x", x, m, k);
    check_view(op, "W", W, n, k);
    check_view(op, "y", y, m, n);
    check_type(op, "W", W, x.dtype);
    HM_CHECK(y.dtype == x.dtype || y.dtype == DType::F32, "cuda linear: y is ", compute_dtype_name(y.dtype),
             ", expected ", compute_dtype_name(x.dtype), " (x's type) or f32");
    if (decode_kernels_on() && skinny_min_rows_ > 0 && m >= skinny_min_rows_ && m <= kSkinnyRows &&
        x.dtype != DType::F32 && size_t(n) * size_t(k) * dtype_size(x.dtype) <= skinny_max_weight_bytes() &&
        cuda::skinny_fits(m, n, k) && cuda::skinny_vectorized(k, x.data, x.ld, W.data, W.ld, dtype_size(x.dtype))) {
      dispatch(x.dtype, [&](auto tag) {
        using T = elem_t<decltype(tag)>;
        if (y.dtype == DType::F32)
          cuda::skinny<T, float>(ptr<float>(y), y.ld, ptr<T>(x), x.ld, ptr<T>(W), W.ld, m, n, k, accumulate, stream_);
        else
          cuda::skinny<T, T>(ptr<T>(y), y.ld, ptr<T>(x), x.ld, ptr<T>(W), W.ld, m, n, k, accumulate, stream_);
      });
      return;
    }
    if (decode_kernels_on() && gemv_takes(m, n, k, dtype_size(x.dtype)) &&
        cuda::gemv_fits(m, k, x.data, x.ld, W.data, W.ld, nullptr, dtype_size(x.dtype))) {
      dispatch(x.dtype, [&](auto tag) {
        using T = elem_t<decltype(tag)>;
        if (y.dtype == DType::F32)
          cuda::gemv<T, float>(ptr<float>(y), int(y.ld), ptr<T>(x), int(x.ld), ptr<T>(W), int(W.ld), m, n, k,
                               accumulate, nullptr, 0.0f, nullptr, stream_);
        else
          cuda::gemv<T, T>(ptr<T>(y), int(y.ld), ptr<T>(x), int(x.ld), ptr<T>(W), int(W.ld), m, n, k, accumulate,
                           nullptr, 0.0f, nullptr, stream_);
      });
      return;
    }
    gemm_->linear(y.data, cuda_type(y.dtype), y.ld, x.data, x.ld, W.data, W.ld, cuda_type(x.dtype), m, n, k,
                  accumulate, stream_);
  }

  // Whether m rows of an n x k weight of es-byte elements go to the GEMV (see kGemvRows).
  bool gemv_takes(int m, int n, int k, size_t es) const {
    return m >= 1 && m <= gemv_rows_ &&
           (m == 1 || (cuda::gemv_rows_fits(m, k, es) && int64_t(m) * n * k <= kGemvRowsMaxWork));
  }

  // Decode steps the GEMV takes (gemv_takes): pre-norm, in_proj and the conv step in one
  // kernel (decode.h). Other decode steps with unit_norm: in_proj over x itself (cuBLASLt), then
  // the conv step applies 1 / rms(x) (conv1d_silu_step_normed), the RMSNorm launch saved.
  // Otherwise the default sequence of ops.
  void mamba_in(Tensor xz, Tensor xc, int conv_col0, const StatePool& conv, Tensor x, Tensor normed, Tensor norm_w,
                float eps, Tensor in_proj, Tensor conv_w, Tensor conv_b, const Ragged& rg, bool unit_norm) override {
    const char* op = "mamba_in";
    const int m = x.rows, k = x.cols, n = in_proj.rows, E = xc.cols, K = conv_w.cols;
    const bool norm = norm_w.data != nullptr;
    const bool step = decode_kernels_on() && is_decode(rg) && !is_packed(in_proj.dtype) && K >= 2 &&
                      K <= cuda::kMaxConv && (conv_col0 == 0 || mamba2_step_);
    if (!step || !gemv_takes(m, n, k, dtype_size(x.dtype)) ||
        !cuda::gemv_fits(m, k, x.data, x.ld, in_proj.data, in_proj.ld, norm ? norm_w.data : nullptr,
                         dtype_size(x.dtype))) {
      if (step && norm && unit_norm && norm_after_ && n == 2 * E && conv_col0 == 0)
        mamba_in_norm_after(xz, xc, conv, x, eps, in_proj, conv_w, conv_b, rg);
      else
        Backend::mamba_in(xz, xc, conv_col0, conv, x, normed, norm_w, eps, in_proj, conv_w, conv_b, rg, unit_norm);
      return;
    }
    check_view(op, "x", x, rg.n_tokens(), k);
    check_view(op, "in_proj", in_proj, n, k);
    check_view(op, "xz", xz, m, n);
    check_view(op, "xc", xc, m, E);
    HM_CHECK(conv_col0 >= 0 && E <= n - conv_col0, "cuda mamba_in: ", E, " conv channels from column ", conv_col0,
             " but in_proj gives ", n, " columns");
    check_view(op, "conv_w", conv_w, E, K);
    check_dense(op, "conv_w", conv_w);
    check_vec(op, "conv_b", conv_b, E);
    if (norm) check_vec(op, "norm_w", norm_w, k);
    for (const auto& [name, t] : {std::pair{"in_proj", &in_proj}, std::pair{"xz", &xz}, std::pair{"xc", &xc},
                                  std::pair{"conv_w", &conv_w}, std::pair{"conv_b", &conv_b}})
      check_type(op, name, *t, x.dtype);
    if (norm) check_type(op, "norm_w", norm_w, x.dtype);
    check_state(op, conv, int64_t(E) * (K - 1));
    check_ragged(op, rg, conv.n_slots);
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::ConvStep<T> cs;
      cs.state = conv.base;
      cs.slots = rg.d_slots();
      cs.w = ptr<T>(conv_w);
      cs.b = ptr<T>(conv_b);
      cs.out = ptr<T>(xc);
      cs.ldo = int(xc.ld);
      cs.c0 = conv_col0;
      cs.E = E;
      cs.K = K;
      cuda::gemv<T, T>(ptr<T>(xz), int(xz.ld), ptr<T>(x), int(x.ld), ptr<T>(in_proj), int(in_proj.ld), m, n, k,
                       false, norm ? ptr<T>(norm_w) : nullptr, eps, &cs, stream_);
    });
  }

  // mamba_in's decode step with unit_norm beyond the GEMV's rows: xz = x . in_proj^T, then each
  // row of xz times 1 / rms(x) inside the conv step.
  void mamba_in_norm_after(Tensor xz, Tensor xc, const StatePool& conv, Tensor x, float eps, Tensor in_proj,
                           Tensor conv_w, Tensor conv_b, const Ragged& rg) {
    const char* op = "mamba_in";
    const int m = x.rows, k = x.cols, E = xc.cols, K = conv_w.cols;
    check_view(op, "x", x, rg.n_tokens(), k);
    check_view(op, "xz", xz, m, 2 * E);
    check_view(op, "xc", xc, m, E);
    check_view(op, "conv_w", conv_w, E, K);
    check_dense(op, "conv_w", conv_w);
    check_vec(op, "conv_b", conv_b, E);
    for (const auto& [name, t] : {std::pair{"xz", &xz}, std::pair{"xc", &xc}, std::pair{"conv_w", &conv_w},
                                  std::pair{"conv_b", &conv_b}})
      check_type(op, name, *t, x.dtype);
    check_state(op, conv, int64_t(E) * (K - 1));
    check_ragged(op, rg, conv.n_slots);
    linear(xz, x, in_proj, false);
    const cuda::RaggedBatch rb = batch(rg);
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::conv1d_silu_step_normed<T>(ptr<T>(xc), int(xc.ld), conv.base, rb.slots, ptr<T>(xz), int(xz.ld),
                                       ptr<T>(x), int(x.ld), k, eps, ptr<T>(conv_w), ptr<T>(conv_b), rb.nseq, E, K,
                                       stream_);
    });
  }

  // Up to 8 rows (gemv_takes): the norm (and a bridge's scale) inside the GEMV, one launch
  // instead of two or three (decode.h); otherwise the default sequence of ops.
  void norm_linear(Tensor y, Tensor x, Tensor normed, Tensor norm_w, float eps, Tensor W, bool accumulate,
                   Tensor scale, Tensor tmp) override {
    const char* op = "norm_linear";
    const int m = x.rows, k = x.cols, n = W.rows;
    const bool scaled = scale.data != nullptr;
    if (!decode_kernels_on() || !gemv_takes(m, n, k, dtype_size(x.dtype)) || is_packed(W.dtype) ||
        (scaled && !accumulate) || !(y.dtype == x.dtype || (y.dtype == DType::F32 && !scaled)) ||
        !cuda::gemv_fits(m, k, x.data, x.ld, W.data, W.ld, norm_w.data, dtype_size(x.dtype))) {
      Backend::norm_linear(y, x, normed, norm_w, eps, W, accumulate, scale, tmp);
      return;
    }
    check_view(op, "x", x, m, k);
    check_view(op, "W", W, n, k);
    check_view(op, "y", y, m, n);
    check_vec(op, "norm_w", norm_w, k);
    check_type(op, "W", W, x.dtype);
    check_type(op, "norm_w", norm_w, x.dtype);
    if (scaled) {
      check_vec(op, "scale", scale, n);
      check_type(op, "scale", scale, x.dtype);
    }
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      if (y.dtype == x.dtype)  // f32 too: a float model's bridge keeps its scale here
        cuda::gemv<T, T>(ptr<T>(y), int(y.ld), ptr<T>(x), int(x.ld), ptr<T>(W), int(W.ld), m, n, k, accumulate,
                         ptr<T>(norm_w), eps, nullptr, stream_, scaled ? ptr<T>(scale) : nullptr);
      else  // f32 logits of a half-precision model (never scaled: checked above)
        cuda::gemv<T, float>(ptr<float>(y), int(y.ld), ptr<T>(x), int(x.ld), ptr<T>(W), int(W.ld), m, n, k, accumulate,
                             ptr<T>(norm_w), eps, nullptr, stream_);
    });
  }

  // Rows the row GEMV takes (gemv_takes, gemv_gate_fits), one norm group a row: the gated norm
  // inside the output projection's GEMV, one launch instead of two; otherwise the default.
  void gated_norm_linear(Tensor out, Tensor y, Tensor z, Tensor norm_w, int group, float eps, Tensor W,
                         bool accumulate, Tensor normed) override {
    const char* op = "gated_norm_linear";
    const int m = y.rows, k = y.cols, n = W.rows;
    if (!decode_kernels_on() || !mamba2_step_ || group != k || !gemv_takes(m, n, k, dtype_size(y.dtype)) ||
        is_packed(W.dtype) || out.dtype != y.dtype ||
        !cuda::gemv_gate_fits(m, k, y.data, y.ld, W.data, W.ld, norm_w.data, z.data, z.ld, dtype_size(y.dtype))) {
      Backend::gated_norm_linear(out, y, z, norm_w, group, eps, W, accumulate, normed);
      return;
    }
    check_view(op, "y", y, m, k);
    check_view(op, "z", z, m, k);
    check_view(op, "W", W, n, k);
    check_view(op, "out", out, m, n);
    check_vec(op, "norm_w", norm_w, k);
    for (const auto& [name, t] : {std::pair{"z", &z}, std::pair{"W", &W}, std::pair{"norm_w", &norm_w}})
      check_type(op, name, *t, y.dtype);
    dispatch(y.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::gemv<T, T>(ptr<T>(out), int(out.ld), ptr<T>(y), int(y.ld), ptr<T>(W), int(W.ld), m, n, k, accumulate,
                       ptr<T>(norm_w), eps, nullptr, stream_, nullptr, ptr<T>(z), int(z.ld));
    });
  }

  // One row: the output projection and the next layer's bridge in one GEMV over the same x
  // (decode.h, gemv_bridge). Rows the bridge's GEMV does not take, with `folded`: both products
  // in one GEMM, then one kernel adds them (the bridge's half times 1 / rms(x)) and writes the
  // next layer's normed input (cuda_ops.h, bridge_add): 2 launches instead of 5. Otherwise the
  // default (linear, then norm_linear).
  bool linear_bridge(Tensor y, Tensor x, Tensor W, Tensor normed, Tensor norm_w, float eps, Tensor bW, Tensor scale,
                     Tensor tmp, Tensor folded, Tensor next_w, Tensor next) override {
    const char* op = "linear_bridge";
    const int m = x.rows, k = x.cols, n = W.rows;
    const size_t es = dtype_size(x.dtype);
    if (decode_kernels_on() && m == 1 && m <= gemv_rows_ && !is_packed(W.dtype) && !is_packed(bW.dtype) &&
        y.dtype == x.dtype &&
        cuda::gemv_bridge_fits(k, x.data, W.data, W.ld, bW.data, bW.ld, norm_w.data, es)) {
      check_view(op, "x", x, m, k);
      check_view(op, "W", W, n, k);
      check_view(op, "bW", bW, n, k);
      check_view(op, "y", y, m, n);
      check_vec(op, "norm_w", norm_w, k);
      check_vec(op, "scale", scale, n);
      for (auto [name, t] : {std::pair{"W", W}, std::pair{"bW", bW}, std::pair{"norm_w", norm_w}, std::pair{"scale", scale}})
        check_type(op, name, t, x.dtype);
      dispatch(x.dtype, [&](auto tag) {
        using T = elem_t<decltype(tag)>;
        cuda::gemv_bridge<T>(ptr<T>(y), ptr<T>(x), ptr<T>(W), int(W.ld), ptr<T>(bW), int(bW.ld), ptr<T>(norm_w), eps,
                             ptr<T>(scale), n, k, stream_);
      });
      return false;
    }
    if (decode_kernels_on() && fold_bridge_ && m > 1 && folded.data != nullptr && !gemv_takes(m, n, k, es) &&
        !is_packed(folded.dtype) && y.dtype == x.dtype) {
      check_view(op, "x", x, m, k);
      check_view(op, "y", y, m, n);
      check_view(op, "folded", folded, 2 * n, k);
      check_view(op, "tmp", tmp, m, 2 * n);
      check_type(op, "folded", folded, x.dtype);
      check_type(op, "tmp", tmp, x.dtype);
      const bool has_next = next_w.data != nullptr;
      if (has_next) {
        check_vec(op, "next_w", next_w, n);
        check_view(op, "next", next, m, n);
        check_type(op, "next_w", next_w, x.dtype);
        check_type(op, "next", next, x.dtype);
      }
      linear(tmp, x, folded, false);
      dispatch(x.dtype, [&](auto tag) {
        using T = elem_t<decltype(tag)>;
        cuda::bridge_add<T>(ptr<T>(y), int(y.ld), ptr<T>(tmp), int(tmp.ld), ptr<T>(x), int(x.ld), m, n, k, eps,
                            has_next ? ptr<T>(next_w) : nullptr, has_next ? ptr<T>(next) : nullptr,
                            has_next ? int(next.ld) : 0, stream_);
      });
      return has_next;
    }
    return Backend::linear_bridge(y, x, W, normed, norm_w, eps, bW, scale, tmp, folded, next_w, next);
  }

  // Decode: dt_proj inside the scan step; otherwise the default (linear, then the scan).
  void dt_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt_r, Tensor dt_w, Tensor dt, Tensor dt_bias,
               const float* A, Tensor B, Tensor C, Tensor Dskip, Tensor z, const Ragged& rg) override {
    const char* op = "dt_scan";
    const int E = x.cols, N = B.cols, R = dt_r.cols, T_ = rg.n_tokens();
    const int nseq = rg.nseq();
    const bool fuse = !is_packed(dt_w.dtype) &&
                      (dt_scan_seqs_ >= 0 ? nseq <= dt_scan_seqs_
                                          : nseq == 1 || size_t(nseq) * size_t(E) * size_t(R) * dt_w.elem_size() <=
                                                             kDtScanBytes);
    if (!decode_kernels_on() || !is_decode(rg) || !fuse || T_ == 0) {
      Backend::dt_scan(y, st, x, dt_r, dt_w, dt, dt_bias, A, B, C, Dskip, z, rg);
      return;
    }
    check_scan(op, y, st, x, dt_bias, A, B, C, Dskip, z, rg);
    check_view(op, "dt_r", dt_r, T_, R);
    check_view(op, "dt_w", dt_w, E, R);
    check_dense(op, "dt_w", dt_w);
    check_type(op, "dt_r", dt_r, x.dtype);
    check_type(op, "dt_w", dt_w, x.dtype);
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::selective_scan_step_dt<T>(ptr<T>(y), int(y.ld), st.base, rg.d_slots(), ptr<T>(x), int(x.ld),
                                      ptr<T>(dt_r), int(dt_r.ld), ptr<T>(dt_w), R, ptr<T>(dt_bias), A, ptr<T>(B),
                                      ptr<T>(C), int(B.ld), ptr<T>(Dskip), ptr<T>(z), int(z.ld), rg.nseq(), E, N,
                                      stream_);
    });
  }

  void swiglu(Tensor out, Tensor g, Tensor u) override {
    const char* op = "swiglu";
    const int n = g.rows, f = g.cols;
    check_view(op, "g", g, n, f);
    check_view(op, "u", u, n, f);
    check_view(op, "out", out, n, f);
    HM_CHECK(g.ld == u.ld, "cuda swiglu: g and u must share a row stride (", g.ld, " vs ", u.ld, ")");
    check_type(op, "u", u, g.dtype);
    check_type(op, "out", out, g.dtype);
    dispatch(g.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::swiglu<T>(ptr<T>(out), int(out.ld), ptr<T>(g), ptr<T>(u), int(g.ld), n, f, stream_);
    });
  }

  void relu2(Tensor out, Tensor x) override {
    const char* op = "relu2";
    const int n = x.rows, f = x.cols;
    check_view(op, "x", x, n, f);
    check_view(op, "out", out, n, f);
    check_type(op, "out", out, x.dtype);
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::relu2<T>(ptr<T>(out), int(out.ld), ptr<T>(x), int(x.ld), n, f, stream_);
    });
  }

  void embedding(Tensor out, Tensor table, const int32_t* ids) override {
    const char* op = "embedding";
    const int n = out.rows, d = table.cols;
    check_view(op, "out", out, n, d);
    check_view(op, "table", table, table.rows, d);
    check_dense(op, "out", out);
    check_dense(op, "table", table);
    check_type(op, "out", out, table.dtype);
    HM_CHECK(ids != nullptr || n == 0, "cuda embedding: no ids for ", n, " rows");
    dispatch(table.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::embedding<T>(ptr<T>(out), ptr<T>(table), ids, n, d, stream_);
    });
  }

  void conv1d_silu(Tensor out, const StatePool& st, Tensor x, Tensor w, Tensor b, const Ragged& rg) override {
    const char* op = "conv1d_silu";
    const int E = x.cols, K = w.cols, T_ = rg.n_tokens();
    HM_CHECK(K >= 2 && K <= cuda::kMaxConv, "cuda conv1d_silu: d_conv must be in [2, ", cuda::kMaxConv,
             "], got ", K);
    check_view(op, "x", x, T_, E);
    check_view(op, "out", out, T_, E);
    check_view(op, "w", w, E, K);
    check_dense(op, "w", w);
    check_vec(op, "b", b, E);
    check_type(op, "out", out, x.dtype);
    check_type(op, "w", w, x.dtype);
    check_type(op, "b", b, x.dtype);
    check_state(op, st, int64_t(E) * (K - 1));
    check_ragged(op, rg, st.n_slots);
    if (rg.nseq() == 0) return;
    const cuda::RaggedBatch rb = batch(rg);
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      if (decode_step(rg))
        cuda::conv1d_silu_step<T>(ptr<T>(out), int(out.ld), st.base, rb.slots, ptr<T>(x), int(x.ld), ptr<T>(w),
                                  ptr<T>(b), rb.nseq, E, K, stream_);
      else
        cuda::conv1d_silu<T>(ptr<T>(out), int(out.ld), st.base, ptr<T>(x), int(x.ld), ptr<T>(w), ptr<T>(b), rb,
                             E, K, stream_);
    });
  }

  // Prefill and decode batches are the same kernel (one block per sequence, head and tile of
  // channels walks the sequence's rows): no workspace, so a decode step captures as it is.
  void ssd_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt, Tensor dt_bias, const float* A, Tensor B,
                Tensor C, Tensor Dskip, int H, int G, float dt_min, float dt_max, const Ragged& rg) override {
    const char* op = "ssd_scan";
    const int E = x.cols, T_ = rg.n_tokens();
    HM_CHECK(H > 0 && G > 0 && H % G == 0 && E % H == 0, "cuda ssd_scan: ", H, " heads in ", G,
             " groups do not fit x's ", E, " columns (heads must divide them, groups the heads)");
    HM_CHECK(B.cols % G == 0, "cuda ssd_scan: B's ", B.cols, " columns are not ", G, " groups of d_state");
    const int P = E / H, N = B.cols / G;
    HM_CHECK(N >= 1 && N <= cuda::kMaxSsdState, "cuda ssd_scan: d_state must be in [1, ", cuda::kMaxSsdState,
             "], got ", N);
    check_view(op, "x", x, T_, E);
    check_view(op, "y", y, T_, E);
    check_view(op, "dt", dt, T_, H);
    check_view(op, "B", B, T_, G * N);
    check_view(op, "C", C, T_, G * N);
    HM_CHECK(B.ld == C.ld, "cuda ssd_scan: B and C must share a row stride (", B.ld, " vs ", C.ld, ")");
    check_vec(op, "dt_bias", dt_bias, H);
    check_vec(op, "Dskip", Dskip, H);
    HM_CHECK(A != nullptr, "cuda ssd_scan: A is null");
    for (const auto& [name, t] : {std::pair{"dt", &dt}, std::pair{"y", &y}, std::pair{"B", &B}, std::pair{"C", &C},
                                  std::pair{"dt_bias", &dt_bias}, std::pair{"Dskip", &Dskip}})
      check_type(op, name, *t, x.dtype);
    check_state(op, st, int64_t(E) * N);
    check_ragged(op, rg, st.n_slots);
    if (rg.nseq() == 0 || T_ == 0) return;
    const cuda::RaggedBatch rb = batch(rg);
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::ssd_scan<T>(ptr<T>(y), int(y.ld), st.base, ptr<T>(x), int(x.ld), ptr<T>(dt), int(dt.ld),
                        ptr<T>(dt_bias), A, ptr<T>(B), ptr<T>(C), int(B.ld), ptr<T>(Dskip), rb, H, P, G, N, dt_min,
                        dt_max, stream_);
    });
  }

  void gated_rmsnorm(Tensor out, Tensor y, Tensor z, Tensor w, int group, float eps) override {
    const char* op = "gated_rmsnorm";
    const int n = y.rows, E = y.cols;
    HM_CHECK(group > 0 && E % group == 0, "cuda gated_rmsnorm: group ", group, " does not divide y's ", E,
             " columns");
    check_view(op, "y", y, n, E);
    check_view(op, "z", z, n, E);
    check_view(op, "out", out, n, E);
    check_vec(op, "w", w, E);
    check_type(op, "z", z, y.dtype);
    check_type(op, "out", out, y.dtype);
    check_type(op, "w", w, y.dtype);
    dispatch(y.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::gated_rmsnorm<T>(ptr<T>(out), int(out.ld), ptr<T>(y), int(y.ld), ptr<T>(z), int(z.ld), ptr<T>(w), n, E,
                             group, eps, stream_);
    });
  }

  void selective_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt, Tensor dt_bias, const float* A,
                      Tensor B, Tensor C, Tensor Dskip, Tensor z, const Ragged& rg) override {
    const char* op = "selective_scan";
    const int E = x.cols, N = B.cols, T_ = rg.n_tokens();
    check_scan(op, y, st, x, dt_bias, A, B, C, Dskip, z, rg);
    check_view(op, "dt", dt, T_, E);
    check_type(op, "dt", dt, x.dtype);
    if (rg.nseq() == 0 || T_ == 0) return;
    const cuda::RaggedBatch rb = batch(rg);
    const bool decode = decode_step(rg);
    // Short prompts (a cache hit's rest, a chat turn): one launch instead of three chunked passes.
    const bool short_seqs = !decode && !inv_ && cuda::scan_short_fits(rb, N);
    // Batch-invariant: one chunk per sequence, its tokens in order whatever the batch.
    const int chunk = decode || short_seqs ? 0 : inv_ ? std::max(rb.max_len, 1) : cuda::scan_chunk_auto(rb, E);
    void* ws = decode || short_seqs ? nullptr : workspace(cuda::selective_scan_workspace_bytes(rb, E, N, chunk));
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      if (short_seqs)
        cuda::selective_scan_short<T>(ptr<T>(y), int(y.ld), st.base, ptr<T>(x), int(x.ld), ptr<T>(dt), int(dt.ld),
                                      ptr<T>(dt_bias), A, ptr<T>(B), ptr<T>(C), int(B.ld), ptr<T>(Dskip), ptr<T>(z),
                                      int(z.ld), rb, E, N, stream_);
      else if (decode)
        cuda::selective_scan_step<T>(ptr<T>(y), int(y.ld), st.base, rb.slots, ptr<T>(x), int(x.ld), ptr<T>(dt),
                                     int(dt.ld), ptr<T>(dt_bias), A, ptr<T>(B), ptr<T>(C), int(B.ld),
                                     ptr<T>(Dskip), ptr<T>(z), int(z.ld), rb.nseq, E, N, stream_);
      else
        cuda::selective_scan<T>(ptr<T>(y), int(y.ld), st.base, ptr<T>(x), int(x.ld), ptr<T>(dt), int(dt.ld),
                                ptr<T>(dt_bias), A, ptr<T>(B), ptr<T>(C), int(B.ld), ptr<T>(Dskip), ptr<T>(z),
                                int(z.ld), rb, E, N, chunk, ws, stream_);
    });
  }

  void rope(Tensor x, int heads, int hd, float theta, const Ragged& rg) override {
    const char* op = "rope";
    HM_CHECK(heads > 0 && hd > 0 && hd % 2 == 0, "cuda rope: heads ", heads, " and head_dim ", hd,
             " must be positive, head_dim even");
    HM_CHECK(int64_t(heads) * hd <= x.cols, "cuda rope: ", heads, " heads of ", hd, " exceed x's ", x.cols,
             " columns");
    check_view(op, "x", x, rg.n_tokens(), x.cols);
    check_ragged(op, rg, INT_MAX);
    if (rg.n_tokens() == 0) return;
    const cuda::RaggedBatch rb = batch(rg);
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::rope<T>(ptr<T>(x), int(x.ld), heads, hd, rb, theta, stream_);
    });
  }

  void kv_write(const KvPool& kv, Tensor k, Tensor v, const Ragged& rg) override {
    const char* op = "kv_write";
    check_kv_type(op, kv.dtype);
    check_kv_pool(op, kv);
    check_view(op, "k", k, rg.n_tokens(), kv.row);
    check_view(op, "v", v, rg.n_tokens(), kv.row);
    check_type(op, "v", v, k.dtype);
    check_ragged(op, rg, kv.n_slots);
    for (int s = 0; s < rg.nseq(); ++s)
      HM_CHECK(rg.pos0(s) >= 0 && int64_t(rg.pos0(s)) + rg.len(s) <= kv.max_ctx, "cuda kv_write: sequence ", s,
               " writes positions ", rg.pos0(s), "..", int64_t(rg.pos0(s)) + rg.len(s) - 1,
               " outside the cache of ", kv.max_ctx);
    if (rg.n_tokens() == 0) return;
    const cuda::RaggedBatch rb = batch(rg);
    dispatch_kv(kv, [&](const auto& pool) {
      dispatch(k.dtype, [&](auto tag) {
        using T = elem_t<decltype(tag)>;
        cuda::kv_write(pool, ptr<T>(k), int(k.ld), ptr<T>(v), int(v.ld), rb, 1, kv.row, stream_);
      });
    });
  }

  void attention(Tensor out, Tensor q, const KvPool& kv, int H, int G, int hd, const Ragged& rg) override {
    attend(out, q, kv, H, G, hd, rg, Tensor(), Tensor());
  }

  // A decode step on the split-KV kernels with a cache of q's type: the kernel reads each new
  // K/V row where it is and stores it in the cache (no kv_write launch); otherwise the default.
  void kv_attention(Tensor out, Tensor q, Tensor k, Tensor v, const KvPool& kv, int H, int G, int hd,
                    const Ragged& rg) override {
    const bool fuse = decode_kernels_on() && is_decode(rg) && kv.dtype != DType::F32 && kv.dtype == q.dtype &&
                      k.dtype == q.dtype && v.dtype == q.dtype && k.ld == v.ld &&
                      cuda::attention_writes_kv(batch(rg), hd, !inv_, true);
    if (!fuse) {
      Backend::kv_attention(out, q, k, v, kv, H, G, hd, rg);
      return;
    }
    const char* op = "kv_attention";
    check_view(op, "k", k, rg.n_tokens(), kv.row);
    check_view(op, "v", v, rg.n_tokens(), kv.row);
    attend(out, q, kv, H, G, hd, rg, k, v);
  }

  // attention(), with k / v (kv_attention's fused decode) the step's new rows.
  void attend(Tensor out, Tensor q, const KvPool& kv, int H, int G, int hd, const Ragged& rg, Tensor k, Tensor v) {
    const char* op = "attention";
    check_kv_type(op, kv.dtype);
    check_kv_pool(op, kv);
    HM_CHECK(hd >= 1 && hd <= cuda::kMaxAnyHd, "cuda attention: head_dim must be in [1, ", cuda::kMaxAnyHd, "], got ",
             hd);
    HM_CHECK(G > 0 && H > 0 && H % G == 0, "cuda attention: n_heads ", H, " is not a multiple of n_kv_heads ", G);
    HM_CHECK(int64_t(G) * hd == kv.row, "cuda attention: ", G, " kv heads of ", hd, " do not match the cache row ",
             kv.row);
    check_view(op, "q", q, rg.n_tokens(), H * hd);
    check_view(op, "out", out, rg.n_tokens(), H * hd);
    check_type(op, "out", out, q.dtype);
    check_ragged(op, rg, kv.n_slots);
    int max_keys = 0;
    for (int s = 0; s < rg.nseq(); ++s) {
      const int64_t end = int64_t(rg.pos0(s)) + rg.len(s);
      HM_CHECK(rg.pos0(s) >= 0 && end <= kv.max_ctx, "cuda attention: sequence ", s, " reads positions up to ",
               end - 1, " of a cache of ", kv.max_ctx);
      if (rg.len(s) > 0) max_keys = std::max(max_keys, int(end));
    }
    if (rg.n_tokens() == 0) return;
    // A captured decode step is replayed at later positions: size it for the whole cache.
    if (capturing()) max_keys = kv.max_ctx;
    const cuda::RaggedBatch rb = batch(rg);
    // The split-KV decode of bf16/f16 caches keeps partials there; the float-cache kernel needs none.
    // Decode sizes it for the whole cache even when run eagerly, so the eager step that precedes
    // a capture has already grown it as far as the captured step needs.
    void* ws = kv.dtype == DType::F32
                   ? nullptr
                   : workspace(cuda::attention_workspace_bytes(rb, H, G, hd, is_decode(rg) ? kv.max_ctx : max_keys,
                                                               !inv_));
    dispatch_kv(kv, [&](const auto& pool) {
      dispatch(q.dtype, [&](auto tag) {
        using T = elem_t<decltype(tag)>;
        cuda::attention(ptr<T>(out), int(out.ld), ptr<T>(q), int(q.ld), pool, rb, H, G, hd, max_keys, ws, stream_,
                        !inv_, k.data ? ptr<T>(k) : nullptr, v.data ? ptr<T>(v) : nullptr, int(k.ld));
      });
    });
  }

  // ---- Training ops of the Mamba path (kernels/cuda/mamba_grad.h): conv and selective scan,
  // every sequence from zero state. Inputs of one compute type (A_log may be f32); parameter
  // gradients of that type or f32, all of one op the same. ----

  void conv1d_silu_train(Tensor out, Tensor x, Tensor w, Tensor b, const Ragged& rg) override {
    const char* op = "conv1d_silu_train";
    train_check::conv1d_silu(name(), op, out, x, w, b, rg);
    check_conv_train(op, {{"out", out}}, x, w, b, rg);
    if (rg.n_tokens() == 0) return;
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::conv1d_silu_train<T>(ptr<T>(out), int(out.ld), ptr<T>(x), int(x.ld), ptr<T>(w), int(w.ld), ptr<T>(b),
                                 batch(rg), x.cols, w.cols, stream_);
    });
  }

  void conv1d_silu_backward(Tensor dx, Tensor dw, Tensor db, Tensor dout, Tensor x, Tensor w, Tensor b,
                            const Ragged& rg) override {
    const char* op = "conv1d_silu_backward";
    train_check::conv1d_silu(name(), op, dout, x, w, b, rg);
    check_conv_train(op, {{"dout", dout}, {"dx", dx}}, x, w, b, rg);
    const int E = x.cols, K = w.cols;
    check_view(op, "dw", dw, E, K);
    check_vec(op, "db", db, E);
    check_grad_type(op, "dw", dw, x.dtype);
    check_type(op, "db", db, dw.dtype);
    if (rg.n_tokens() == 0) return;
    void* ws = workspace(cuda::conv1d_silu_backward_workspace_bytes(rg.n_tokens(), E, K));
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      dispatch_grad<T>(dw.dtype, [&](auto gtag) {
        using G = elem_t<decltype(gtag)>;
        cuda::conv1d_silu_backward<T, G>(ptr<T>(dx), int(dx.ld), ptr<G>(dw), int(dw.ld), ptr<G>(db), ptr<T>(dout),
                                         int(dout.ld), ptr<T>(x), int(x.ld), ptr<T>(w), int(w.ld), ptr<T>(b),
                                         batch(rg), E, K, ws, stream_);
      });
    });
  }

  // The saved states: float, the state entering every chunk of each sequence (mamba_grad.h).
  size_t scan_saved_bytes(const Ragged& rg, int E, int N, int chunk) const override {
    return cuda::scan_train_saved_bytes(scan_shape(rg, E, N, chunk));
  }

  void selective_scan_train(Tensor y, void* saved, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B,
                            Tensor C, Tensor Dskip, Tensor z, int chunk, const Ragged& rg) override {
    const char* op = "selective_scan_train";
    train_check::selective_scan(name(), op, y, x, dt, dt_bias, A_log, B, C, Dskip, z, rg);
    check_scan_train(op, {{"y", y}}, x, dt, dt_bias, A_log, B, C, Dskip, z, rg);
    const cuda::ScanTrainShape sh = scan_shape(rg, x.cols, B.cols, chunk);
    HM_CHECK(saved != nullptr || cuda::scan_train_saved_bytes(sh) == 0, "cuda ", op, ": no buffer for the saved states");
    if (rg.n_tokens() == 0) return;
    void* ws = workspace(cuda::scan_train_workspace_bytes(sh, false));
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::selective_scan_train<T>(ptr<T>(y), int(y.ld), static_cast<float*>(saved),
                                    scan_in<T>(x, dt, dt_bias, A_log, B, C, Dskip, z), batch(rg), sh, ws, stream_);
    });
  }

  void selective_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor dz, Tensor ddt_bias,
                               Tensor dA_log, Tensor dDskip, Tensor dy, const void* saved, Tensor x, Tensor dt,
                               Tensor dt_bias, Tensor A_log, Tensor B, Tensor C, Tensor Dskip, Tensor z, int chunk,
                               const Ragged& rg) override {
    const char* op = "selective_scan_backward";
    train_check::selective_scan(name(), op, dy, x, dt, dt_bias, A_log, B, C, Dskip, z, rg);
    check_scan_train(op, {{"dy", dy}, {"dx", dx}, {"ddt", ddt}, {"dz", dz}}, x, dt, dt_bias, A_log, B, C, Dskip, z,
                     rg);
    const int E = x.cols, N = B.cols, T_ = rg.n_tokens();
    check_view(op, "dB", dB, T_, N);
    check_view(op, "dC", dC, T_, N);
    check_type(op, "dB", dB, x.dtype);
    check_type(op, "dC", dC, x.dtype);
    check_view(op, "dA_log", dA_log, E, N);
    check_vec(op, "ddt_bias", ddt_bias, E);
    check_vec(op, "dDskip", dDskip, E);
    check_grad_type(op, "dA_log", dA_log, x.dtype);
    check_type(op, "ddt_bias", ddt_bias, dA_log.dtype);
    check_type(op, "dDskip", dDskip, dA_log.dtype);
    const cuda::ScanTrainShape sh = scan_shape(rg, E, N, chunk);
    HM_CHECK(saved != nullptr || cuda::scan_train_saved_bytes(sh) == 0, "cuda ", op, ": no saved states");
    if (T_ == 0) return;
    void* ws = workspace(cuda::scan_train_workspace_bytes(sh, true));
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      dispatch_grad<T>(dA_log.dtype, [&](auto gtag) {
        using G = elem_t<decltype(gtag)>;
        cuda::ScanTrainGrad<T, G> gd;
        gd.dx = ptr<T>(dx);
        gd.lddx = int(dx.ld);
        gd.ddt = ptr<T>(ddt);
        gd.lddt = int(ddt.ld);
        gd.dB = ptr<T>(dB);
        gd.lddB = int(dB.ld);
        gd.dC = ptr<T>(dC);
        gd.lddC = int(dC.ld);
        gd.dz = ptr<T>(dz);
        gd.lddz = int(dz.ld);
        gd.ddt_bias = ptr<G>(ddt_bias);
        gd.dA_log = ptr<G>(dA_log);
        gd.lddA = int(dA_log.ld);
        gd.dDskip = ptr<G>(dDskip);
        cuda::selective_scan_backward<T, G>(gd, ptr<T>(dy), int(dy.ld), static_cast<const float*>(saved),
                                            scan_in<T>(x, dt, dt_bias, A_log, B, C, Dskip, z), batch(rg), sh, ws,
                                            stream_);
      });
    });
  }

  // Mamba-2 training (kernels/cuda/ssd_grad.cu). Activations and their gradients in the compute
  // type; A_log and the parameter gradients float32.
  void check_ssd_train(const char* op, std::initializer_list<std::pair<const char*, Tensor>> rows, Tensor x, Tensor dt,
                       Tensor dt_bias, Tensor A_log, Tensor B, Tensor C, Tensor Dskip, int H, int G,
                       const Ragged& rg) {
    const int E = x.cols, T_ = rg.n_tokens(), N = B.cols / G;
    HM_CHECK(N >= 1 && N <= cuda::kMaxSsdState, "cuda ", op, ": d_state must be in [1, ", cuda::kMaxSsdState,
             "], got ", N);
    for (const auto& [nm, t] : rows) {
      check_view(op, nm, t, T_, E);
      check_type(op, nm, t, x.dtype);
    }
    check_view(op, "x", x, T_, E);
    check_view(op, "dt", dt, T_, H);
    check_view(op, "B", B, T_, G * N);
    check_view(op, "C", C, T_, G * N);
    HM_CHECK(B.ld == C.ld, "cuda ", op, ": B and C must share a row stride (", B.ld, " vs ", C.ld, ")");
    check_vec(op, "dt_bias", dt_bias, H);
    check_vec(op, "Dskip", Dskip, H);
    check_vec(op, "A_log", A_log, H);
    for (const auto& [nm, t] : {std::pair{"dt", &dt}, std::pair{"B", &B}, std::pair{"C", &C},
                                std::pair{"dt_bias", &dt_bias}, std::pair{"Dskip", &Dskip}})
      check_type(op, nm, *t, x.dtype);
    check_type(op, "A_log", A_log, DType::F32);
    for (int s = 0; s < rg.nseq(); ++s)
      HM_CHECK(rg.slot(s) == s, "cuda ", op, ": training batches put sequence s in slot s (sequence ", s, " is in slot ",
               rg.slot(s), ")");
  }
  void ssd_scan_train(Tensor y, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C, Tensor Dskip,
                      int heads, int groups, float dt_min, float dt_max, const Ragged& rg) override {
    const char* op = "ssd_scan_train";
    train_check::ssd_scan(name(), op, y, x, dt, dt_bias, A_log, B, C, Dskip, heads, groups, rg);
    check_ssd_train(op, {{"y", y}}, x, dt, dt_bias, A_log, B, C, Dskip, heads, groups, rg);
    if (rg.n_tokens() == 0) return;
    const int P = x.cols / heads, N = B.cols / groups;
    const cuda::RaggedBatch rb = batch(rg);
    void* ws = workspace(cuda::ssd_train_workspace_bytes(rb, heads, P, N));
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::ssd_scan_train<T>(ptr<T>(y), int(y.ld), ptr<T>(x), int(x.ld), ptr<T>(dt), int(dt.ld), ptr<T>(dt_bias),
                              A_log.f32(), ptr<T>(B), ptr<T>(C), int(B.ld), ptr<T>(Dskip), rb, heads, P, groups, N,
                              dt_min, dt_max, ws, stream_);
    });
  }

  void ssd_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor ddt_bias, Tensor dA_log, Tensor dDskip,
                         Tensor dy, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C,
                         Tensor Dskip, int heads, int groups, float dt_min, float dt_max, const Ragged& rg) override {
    const char* op = "ssd_scan_backward";
    train_check::ssd_scan(name(), op, dy, x, dt, dt_bias, A_log, B, C, Dskip, heads, groups, rg);
    check_ssd_train(op, {{"dy", dy}, {"dx", dx}}, x, dt, dt_bias, A_log, B, C, Dskip, heads, groups, rg);
    const int T_ = rg.n_tokens(), P = x.cols / heads, N = B.cols / groups;
    check_view(op, "ddt", ddt, T_, heads);
    check_view(op, "dB", dB, T_, groups * N);
    check_view(op, "dC", dC, T_, groups * N);
    HM_CHECK(dB.ld == dC.ld, "cuda ", op, ": dB and dC must share a row stride (", dB.ld, " vs ", dC.ld, ")");
    for (const auto& [nm, t] : {std::pair{"ddt", &ddt}, std::pair{"dB", &dB}, std::pair{"dC", &dC}})
      check_type(op, nm, *t, x.dtype);
    for (const auto& [nm, t] : {std::pair{"ddt_bias", &ddt_bias}, std::pair{"dA_log", &dA_log},
                                std::pair{"dDskip", &dDskip}}) {
      check_vec(op, nm, *t, heads);
      check_type(op, nm, *t, DType::F32);
    }
    if (T_ == 0) return;
    const cuda::RaggedBatch rb = batch(rg);
    void* ws = workspace(cuda::ssd_backward_workspace_bytes(rb, heads, P, N));
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::ssd_scan_backward<T>(ptr<T>(dx), int(dx.ld), ptr<T>(ddt), int(ddt.ld), ptr<T>(dB), ptr<T>(dC), int(dB.ld),
                                 ddt_bias.f32(), dA_log.f32(), dDskip.f32(), ptr<T>(dy), int(dy.ld), ptr<T>(x),
                                 int(x.ld), ptr<T>(dt), int(dt.ld), ptr<T>(dt_bias), A_log.f32(), ptr<T>(B),
                                 ptr<T>(C), int(B.ld), ptr<T>(Dskip), rb, heads, P, groups, N, dt_min, dt_max, ws,
                                 stream_);
    });
  }

  void gated_rmsnorm_backward(Tensor dy, Tensor dz, Tensor dw, Tensor dout, Tensor y, Tensor z, Tensor w, int group,
                              float eps) override {
    const char* op = "gated_rmsnorm_backward";
    train_check::gated_rmsnorm(name(), op, dout, y, z, w, group);
    const int n = y.rows, E = y.cols;
    for (const auto& [nm, t] : {std::pair{"dy", &dy}, std::pair{"dz", &dz}, std::pair{"dout", &dout},
                                std::pair{"y", &y}, std::pair{"z", &z}}) {
      check_view(op, nm, *t, n, E);
      check_type(op, nm, *t, y.dtype);
    }
    check_vec(op, "w", w, E);
    check_type(op, "w", w, y.dtype);
    check_vec(op, "dw", dw, E);
    check_type(op, "dw", dw, DType::F32);
    if (n == 0 || E == 0) return;
    void* ws = workspace(cuda::gated_rmsnorm_backward_workspace_bytes(n, E, group));
    dispatch(y.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::gated_rmsnorm_backward<T>(ptr<T>(dy), int(dy.ld), ptr<T>(dz), int(dz.ld), dw.f32(), ptr<T>(dout),
                                      int(dout.ld), ptr<T>(y), int(y.ld), ptr<T>(z), int(z.ld), ptr<T>(w), n, E,
                                      group, eps, ws, stream_);
    });
  }

  static cuda::ScanTrainShape scan_shape(const Ragged& rg, int E, int N, int chunk) {
    return cuda::scan_train_shape(rg.host_cu().data(), rg.nseq(), E, N, chunk);
  }
  template <class T>
  static cuda::ScanTrainIn<T> scan_in(Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C,
                                      Tensor Dskip, Tensor z) {
    cuda::ScanTrainIn<T> in;
    in.x = ptr<T>(x);
    in.ldx = int(x.ld);
    in.dt = ptr<T>(dt);
    in.lddt = int(dt.ld);
    in.dt_bias = ptr<T>(dt_bias);
    in.B = ptr<T>(B);
    in.C = ptr<T>(C);
    in.ldbc = int(B.ld);
    in.Dskip = ptr<T>(Dskip);
    in.z = ptr<T>(z);
    in.ldz = int(z.ld);
    in.A_log = A_log.data;
    in.ldA = int(A_log.ld);
    in.a_log_f32 = A_log.dtype == DType::F32;
    return in;
  }
  // The conv's [n_tokens, E] views `acts` and x, w [E, K], b [E], all of x's type.
  static void check_conv_train(const char* op, std::initializer_list<Named> acts, const Tensor& x, const Tensor& w,
                               const Tensor& b, const Ragged& rg) {
    const int E = x.cols, K = w.cols, T_ = rg.n_tokens();
    HM_CHECK(K >= 2 && K <= cuda::kMaxConv, "cuda ", op, ": d_conv must be in [2, ", cuda::kMaxConv, "], got ", K);
    check_view(op, "x", x, T_, E);
    for (const auto& [nm, t] : acts) {
      check_view(op, nm, t, T_, E);
      check_type(op, nm, t, x.dtype);
    }
    check_view(op, "w", w, E, K);
    check_vec(op, "b", b, E);
    check_type(op, "w", w, x.dtype);
    check_type(op, "b", b, x.dtype);
    HM_CHECK(rg.nseq() == 0 || rg.d_cu() != nullptr, "cuda ", op, ": the Ragged batch was not uploaded");
  }
  // The scan's inputs and the [n_tokens, E] views `acts`: one type but A_log (or f32).
  static void check_scan_train(const char* op, std::initializer_list<Named> acts, const Tensor& x, const Tensor& dt,
                               const Tensor& dt_bias, const Tensor& A_log, const Tensor& B, const Tensor& C,
                               const Tensor& Dskip, const Tensor& z, const Ragged& rg) {
    const int E = x.cols, N = B.cols, T_ = rg.n_tokens();
    HM_CHECK(N >= 1 && N <= cuda::kMaxState, "cuda ", op, ": d_state must be in [1, ", cuda::kMaxState, "], got ", N);
    for (const auto& [nm, t] : std::initializer_list<Named>{{"x", x}, {"dt", dt}, {"z", z}}) {
      check_view(op, nm, t, T_, E);
      check_type(op, nm, t, x.dtype);
    }
    for (const auto& [nm, t] : acts) {
      check_view(op, nm, t, T_, E);
      check_type(op, nm, t, x.dtype);
    }
    check_view(op, "B", B, T_, N);
    check_view(op, "C", C, T_, N);
    HM_CHECK(B.ld == C.ld, "cuda ", op, ": B and C must share a row stride (", B.ld, " vs ", C.ld, ")");
    check_type(op, "B", B, x.dtype);
    check_type(op, "C", C, x.dtype);
    check_vec(op, "dt_bias", dt_bias, E);
    check_vec(op, "Dskip", Dskip, E);
    check_type(op, "dt_bias", dt_bias, x.dtype);
    check_type(op, "Dskip", Dskip, x.dtype);
    check_view(op, "A_log", A_log, E, N);
    check_grad_type(op, "A_log", A_log, x.dtype);
    HM_CHECK(rg.nseq() == 0 || rg.d_cu() != nullptr, "cuda ", op, ": the Ragged batch was not uploaded");
  }

  void copy_rows(Tensor dst, const int32_t* dst_idx, Tensor src, const int32_t* src_idx, int n) override {
    check_rows("copy_rows", dst, dst_idx, src, src_idx, n);
    dispatch(dst.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::copy_rows<T>(ptr<T>(dst), dst.ld, dst.rows, dst_idx, ptr<T>(src), src.ld, src.rows, src_idx, n,
                         dst.cols, stream_);
    });
  }

  void add_rows(Tensor dst, const int32_t* dst_idx, Tensor src, const int32_t* src_idx, int n,
                const float* row_gate, Tensor scale) override {
    check_rows("add_rows", dst, dst_idx, src, src_idx, n);
    if (!scale.empty()) {
      check_vec("add_rows", "scale", scale, dst.cols);
      check_type("add_rows", "scale", scale, dst.dtype);
    }
    dispatch(dst.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::add_rows<T>(ptr<T>(dst), dst.ld, dst.rows, dst_idx, ptr<T>(src), src.ld, src.rows, src_idx, n,
                        dst.cols, row_gate, scale.empty() ? nullptr : ptr<T>(scale), stream_);
    });
  }

  // ---- Training ops (issue 15; kernels/cuda/grad.h). Activations are of one compute type;
  // parameter gradients (dW, dw, dtable) and the GEMMs' dx and dhn may also be f32; lse is f32.
  // Every reduction has one fixed order, so a rerun gives the same bits. ----

  void linear_backward(Tensor dx, Tensor dW, Tensor dy, Tensor x, Tensor W, bool accumulate_dx) override {
    const char* op = "linear_backward";
    train_check::linear_backward(name(), dx, dW, dy, x, W);
    const int m = x.rows, k = x.cols, n = W.rows;
    check_view(op, "dy", dy, m, n);
    check_view(op, "x", x, m, k);
    check_view(op, "W", W, n, k);
    check_view(op, "dW", dW, n, k);
    check_type(op, "x", x, dy.dtype);
    check_type(op, "W", W, dy.dtype);
    check_grad_type(op, "dW", dW, dy.dtype);
    if (!dx.empty()) {
      check_view(op, "dx", dx, m, k);
      check_grad_type(op, "dx", dx, dy.dtype);
    }
    const cudaDataType_t tin = cuda_type(dy.dtype);
    if (!dx.empty())  // dx [m,k] (=|+=) dy [m,n] . W [n,k]
      blas().gemm(dx.data, cuda_type(dx.dtype), dx.ld, dy.data, dy.ld, false, W.data, W.ld, false, tin, m, k, n,
                  accumulate_dx, stream_);
    // dW [n,k] += dy^T [n,m] . x [m,k]
    blas().gemm(dW.data, cuda_type(dW.dtype), dW.ld, dy.data, dy.ld, true, x.data, x.ld, false, tin, n, k, m, true,
                stream_);
  }

  void rmsnorm_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, float eps,
                        bool accumulate_dx) override {
    const char* op = "rmsnorm_backward";
    train_check::rmsnorm_backward(name(), dx, dw, dout, x, w);
    const int n = x.rows, d = x.cols;
    check_view(op, "x", x, n, d);
    check_view(op, "dout", dout, n, d);
    check_view(op, "dx", dx, n, d);
    check_vec(op, "w", w, d);
    check_vec(op, "dw", dw, d);
    check_type(op, "dout", dout, x.dtype);
    check_type(op, "dx", dx, x.dtype);
    check_type(op, "w", w, x.dtype);
    check_grad_type(op, "dw", dw, x.dtype);
    if (n == 0 || d == 0) return;
    void* ws = workspace(cuda::rmsnorm_backward_workspace_bytes(n, d));
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      dispatch_grad<T>(dw.dtype, [&](auto gtag) {
        using G = elem_t<decltype(gtag)>;
        cuda::rmsnorm_backward<T, G>(ptr<T>(dx), int(dx.ld), ptr<G>(dw), ptr<T>(dout), int(dout.ld), ptr<T>(x),
                                     int(x.ld), ptr<T>(w), n, d, eps, accumulate_dx, ws, stream_);
      });
    });
  }

  void swiglu_backward(Tensor dg, Tensor du, Tensor dout, Tensor g, Tensor u) override {
    const char* op = "swiglu_backward";
    train_check::swiglu_backward(name(), dg, du, dout, g, u);
    const int n = g.rows, f = g.cols;
    for (const auto& [nm, t] : {std::pair{"dg", &dg}, std::pair{"du", &du}, std::pair{"dout", &dout},
                                std::pair{"g", &g}, std::pair{"u", &u}}) {
      check_view(op, nm, *t, n, f);
      check_type(op, nm, *t, g.dtype);
    }
    dispatch(g.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::swiglu_backward<T>(ptr<T>(dg), int(dg.ld), ptr<T>(du), int(du.ld), ptr<T>(dout), int(dout.ld), ptr<T>(g),
                               int(g.ld), ptr<T>(u), int(u.ld), n, f, stream_);
    });
  }

  void relu2_backward(Tensor dx, Tensor dout, Tensor x) override {
    const char* op = "relu2_backward";
    train_check::relu2_backward(name(), dx, dout, x);
    const int n = x.rows, f = x.cols;
    for (const auto& [nm, t] : {std::pair{"dx", &dx}, std::pair{"dout", &dout}, std::pair{"x", &x}}) {
      check_view(op, nm, *t, n, f);
      check_type(op, nm, *t, x.dtype);
    }
    dispatch(x.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::relu2_backward<T>(ptr<T>(dx), int(dx.ld), ptr<T>(dout), int(dout.ld), ptr<T>(x), int(x.ld), n, f, stream_);
    });
  }

  void attention_train(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, int H, int G, int hd,
                       const Ragged& rg) override {
    const char* op = "attention_train";
    train_check::attention(name(), op, out, lse, q, k, v, H, G, hd, rg);
    check_attention(op, q.dtype, {{"out", out}, {"q", q}}, {{"k", k}, {"v", v}}, lse, H, G, hd, rg);
    if (rg.n_tokens() == 0) return;
    dispatch(q.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::attention_train<T>(ptr<T>(out), int(out.ld), ptr<float>(lse), int(lse.ld), ptr<T>(q), int(q.ld), ptr<T>(k),
                               int(k.ld), ptr<T>(v), int(v.ld), batch(rg), H, G, hd, stream_);
    });
  }

  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,
                          Tensor lse, int H, int G, int hd, const Ragged& rg) override {
    const char* op = "attention_backward";
    train_check::attention(name(), op, out, lse, q, k, v, H, G, hd, rg);
    check_attention(op, q.dtype, {{"out", out}, {"q", q}, {"dq", dq}, {"dout", dout}}, {{"k", k}, {"v", v}, {"dk", dk}, {"dv", dv}},
                    lse, H, G, hd, rg);
    const int n = rg.n_tokens();
    if (n == 0) return;
    void* ws = workspace(cuda::attention_backward_workspace_bytes(n, H));
    dispatch(q.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::attention_backward<T>(ptr<T>(dq), int(dq.ld), ptr<T>(dk), int(dk.ld), ptr<T>(dv), int(dv.ld), ptr<T>(dout),
                                  int(dout.ld), ptr<T>(q), int(q.ld), ptr<T>(k), int(k.ld), ptr<T>(v), int(v.ld),
                                  ptr<T>(out), int(out.ld), ptr<float>(lse), int(lse.ld), batch(rg), H, G, hd, ws,
                                  stream_);
    });
  }

  void rope_backward(Tensor dx, int heads, int hd, float theta, const Ragged& rg) override {
    const char* op = "rope_backward";
    train_check::rope(name(), op, dx, heads, hd, rg);
    check_view(op, "dx", dx, rg.n_tokens(), dx.cols);
    check_ragged(op, rg, INT_MAX);
    if (rg.n_tokens() == 0) return;
    dispatch(dx.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::rope_backward<T>(ptr<T>(dx), int(dx.ld), heads, hd, batch(rg), theta, stream_);
    });
  }

  // The ids come to the host (one wait) to be checked as the CPU backend checks them and grouped
  // by id (group_rows_by_id): each table row's gradient is then one sum over its rows in batch
  // order, deterministic whatever the repeats, with no atomics.
  void embedding_backward(Tensor dtable, Tensor dout, const int32_t* ids) override {
    const char* op = "embedding_backward";
    train_check::embedding_backward(name(), dtable, dout);
    const int n = dout.rows, d = dout.cols;
    check_view(op, "dout", dout, n, d);
    check_view(op, "dtable", dtable, dtable.rows, d);
    check_grad_type(op, "dtable", dtable, dout.dtype);
    if (n == 0 || d == 0) return;
    HM_CHECK(ids != nullptr, "cuda embedding_backward: no ids for ", n, " rows");
    std::vector<int32_t> id(static_cast<size_t>(n));
    to_host(id.data(), ids, sizeof(int32_t) * id.size());
    const IdRows g = group_rows_by_id(id.data(), n, dtable.rows, "cuda embedding_backward");
    const int nseg = g.nseg;
    auto* dplan = static_cast<int32_t*>(workspace(sizeof(int32_t) * g.plan.size()));
    to_device(dplan, g.plan.data(), sizeof(int32_t) * g.plan.size());
    dispatch(dout.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      dispatch_grad<T>(dtable.dtype, [&](auto gtag) {
        using G = elem_t<decltype(gtag)>;
        cuda::embedding_backward<T, G>(ptr<G>(dtable), int(dtable.ld), ptr<T>(dout), int(dout.ld), dplan, dplan + n,
                                       dplan + n + nseg + 1, nseg, d, stream_);
      });
    });
  }

  // Per block of rows: float logits through cuBLAS, the softmax rows on the device (dlogits in
  // the compute type, the GEMMs' input), then dhn = dz W and dW += dz^T hn; the row losses are
  // summed on the host in double. At most kHeadBlockBytes of logits exist at once.
  double cross_entropy_head(Tensor dhn, Tensor dW, Tensor hn, Tensor W, const int32_t* targets,
                            double scale) override {
    const char* op = "cross_entropy_head";
    train_check::cross_entropy_head(name(), dhn, dW, hn, W);
    const int n = hn.rows, D = hn.cols, V = W.rows;
    check_view(op, "hn", hn, n, D);
    check_view(op, "W", W, V, D);
    check_view(op, "dhn", dhn, n, D);
    check_view(op, "dW", dW, V, D);
    check_type(op, "W", W, hn.dtype);
    check_grad_type(op, "dhn", dhn, hn.dtype);
    check_grad_type(op, "dW", dW, hn.dtype);
    const cudaDataType_t tin = cuda_type(hn.dtype);
    if (n == 0) return 0.0;
    HM_CHECK(targets != nullptr, "cuda cross_entropy_head: no targets for ", n, " rows");
    std::vector<int32_t> tg(static_cast<size_t>(n));
    to_host(tg.data(), targets, sizeof(int32_t) * tg.size());
    for (int i = 0; i < n; ++i)
      HM_CHECK(tg[size_t(i)] >= -1 && tg[size_t(i)] < V, "cuda cross_entropy_head: target ", tg[size_t(i)], " at row ",
               i, " is outside [-1, ", V, ")");
    // The logits come out of the GEMM in the compute type, as the peer's autocast makes them, and
    // dz is written over them (float math in between). HM_CUDA_HEAD_LOGITS=f32 keeps them in float
    // with dz beside them: 6 bytes a logit instead of 2 (H100, stop 37: the seed step 27.3 ms
    // against 28.7, the 130M 79.0 against 80.3).
    const bool logits_f32 = hn.dtype == DType::F32 || !head_logits_in_type();
    const size_t es = dtype_size(hn.dtype), zs = logits_f32 ? sizeof(float) : es;
    const size_t dz_bytes = logits_f32 && hn.dtype != DType::F32 ? es : 0;  // 0: dz is z
    const int rows = int(std::clamp<size_t>(head_block_bytes() / (size_t(V) * (zs + dz_bytes)), 1, size_t(n)));
    auto round_up = [](size_t b) { return (b + 255) / 256 * 256; };
    const size_t loss_b = round_up(sizeof(float) * size_t(n)), z_b = round_up(zs * size_t(rows) * V);
    char* ws = static_cast<char*>(workspace(loss_b + z_b + dz_bytes * size_t(rows) * V));
    auto* loss = reinterpret_cast<float*>(ws);
    void* z = ws + loss_b;
    void* dz = dz_bytes == 0 ? z : static_cast<void*>(ws + loss_b + z_b);
    for (int r0 = 0; r0 < n; r0 += rows) {
      const int nb = std::min(rows, n - r0);
      const void* h = hn.row(r0);
      // z [nb,V] = hn [nb,D] . W [V,D]^T
      blas().gemm(z, logits_f32 ? CUDA_R_32F : tin, V, h, hn.ld, false, W.data, W.ld, true, tin, nb, V, D, false,
                  stream_);
      dispatch(hn.dtype, [&](auto tag) {
        using T = elem_t<decltype(tag)>;
        if (logits_f32)
          cuda::cross_entropy_rows<float, T>(static_cast<T*>(dz), static_cast<const float*>(z), targets + r0,
                                             loss + r0, nb, V, float(scale), stream_);
        else
          cuda::cross_entropy_rows<T, T>(static_cast<T*>(dz), static_cast<const T*>(z), targets + r0, loss + r0, nb,
                                         V, float(scale), stream_);
      });
      // dhn [nb,D] = dz [nb,V] . W [V,D]; dW [V,D] += dz^T [V,nb] . hn [nb,D]
      blas().gemm(dhn.row(r0), cuda_type(dhn.dtype), dhn.ld, dz, V, false, W.data, W.ld, false, tin, nb, D, V, false,
                  stream_);
      blas().gemm(dW.data, cuda_type(dW.dtype), dW.ld, dz, V, true, h, hn.ld, false, tin, V, D, nb, true, stream_);
    }
    std::vector<float> row_loss(static_cast<size_t>(n));
    to_host(row_loss.data(), loss, sizeof(float) * row_loss.size());
    double sum = 0;
    for (const float l : row_loss) sum += double(l);
    return sum;
  }

  void scale_cols_backward(Tensor dsrc, Tensor dscale, Tensor ddst, Tensor src, Tensor scale) override {
    const char* op = "scale_cols_backward";
    train_check::scale_cols_backward(name(), dsrc, dscale, ddst, src, scale);
    const int n = src.rows, d = src.cols;
    check_view(op, "src", src, n, d);
    check_view(op, "ddst", ddst, n, d);
    check_view(op, "dsrc", dsrc, n, d);
    check_vec(op, "scale", scale, d);
    check_vec(op, "dscale", dscale, d);
    check_type(op, "ddst", ddst, src.dtype);
    check_type(op, "dsrc", dsrc, src.dtype);
    check_type(op, "scale", scale, src.dtype);
    check_grad_type(op, "dscale", dscale, src.dtype);
    if (n == 0 || d == 0) return;
    void* ws = workspace(cuda::scale_cols_backward_workspace_bytes(n, d));
    dispatch(src.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      dispatch_grad<T>(dscale.dtype, [&](auto gtag) {
        using G = elem_t<decltype(gtag)>;
        cuda::scale_cols_backward<T, G>(ptr<T>(dsrc), int(dsrc.ld), ptr<G>(dscale), ptr<T>(ddst), int(ddst.ld),
                                        ptr<T>(src), int(src.ld), ptr<T>(scale), n, d, ws, stream_);
      });
    });
  }

  void router(Tensor r, Tensor feats, Tensor u, Tensor w, Tensor fw, Tensor b, const Ragged& rg, int chunk,
              const StatePool* st) override {
    const char* op = "router";
    train_check::router(name(), r, feats, u, w, fw, b, rg, chunk, st);
    const int n = rg.n_tokens();
    check_view(op, "u", u, n, u.cols);
    if (feats.data) check_dense(op, "feats", feats);
    check_vec(op, "r", r, n);
    check_vec(op, "w", w, u.cols);
    check_vec(op, "fw", fw, kRouterFeatures);
    check_vec(op, "b", b, 1);
    check_ragged(op, rg, INT_MAX);
    if (n == 0) return;
    float* s_tmp = chunk > 0 ? static_cast<float*>(workspace(sizeof(float) * size_t(n))) : nullptr;
    dispatch(u.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::router<T>(r.f32(), s_tmp, feats.data ? feats.f32() : nullptr, ptr<T>(u), int(u.ld), u.cols, w.f32(),
                      fw.f32(), b.f32(), batch(rg), chunk, st ? st->base : nullptr, stream_);
    });
  }
  // a_idx is not range-checked here (it lives on the device), as add_rows' indices.
  void row_dots(Tensor out, Tensor a, const int32_t* a_idx, Tensor b) override {
    const char* op = "row_dots";
    train_check::row_dots(name(), out, a, b);
    check_view(op, "a", a, a.rows, a.cols);
    check_view(op, "b", b, b.rows, b.cols);
    check_vec(op, "out", out, b.rows);
    HM_CHECK(a_idx || b.rows <= a.rows, "cuda row_dots: ", b.rows, " rows of b against a of ", a.rows, " without indices");
    dispatch(a.dtype, [&](auto tag) {
      using T = elem_t<decltype(tag)>;
      cuda::row_dots<T>(out.f32(), ptr<T>(a), int(a.ld), a_idx, ptr<T>(b), int(b.ld), b.rows, b.cols, stream_);
    });
  }

  void convert(Tensor dst, Tensor src) override {
    const char* op = "convert";
    train_check::convert(name(), dst, src);
    check_view(op, "dst", dst, src.rows, src.cols);
    check_view(op, "src", src, src.rows, src.cols);
    HM_CHECK(dst.dtype == DType::F32 || src.dtype == DType::F32, "cuda convert: one side must be float32, got ",
             compute_dtype_name(src.dtype), " -> ", compute_dtype_name(dst.dtype));
    if (src.rows == 0 || src.cols == 0) return;
    if (src.dtype == DType::F32) {
      dispatch(dst.dtype, [&](auto tag) {
        using T = elem_t<decltype(tag)>;
        cuda::convert<T, float>(ptr<T>(dst), dst.ld, ptr<float>(src), src.ld, src.rows, src.cols, stream_);
      });
    } else {
      dispatch(src.dtype, [&](auto tag) {
        using T = elem_t<decltype(tag)>;
        cuda::convert<float, T>(ptr<float>(dst), dst.ld, ptr<T>(src), src.ld, src.rows, src.cols, stream_);
      });
    }
  }

  // The chunk table is built on the host and uploaded per call (a few thousand entries).
  double sum_squares(const float* x, const std::vector<ArenaSpan>& spans) override {
    train_check::spans(name(), "sum_squares", spans);
    const std::vector<cuda::OptChunk> ch = opt_chunks(spans);
    if (ch.empty()) return 0.0;
    const size_t tb = (sizeof(cuda::OptChunk) * ch.size() + 255) / 256 * 256;
    char* ws = static_cast<char*>(workspace(tb + sizeof(double) * ch.size()));
    auto* table = reinterpret_cast<cuda::OptChunk*>(ws);
    auto* partial = reinterpret_cast<double*>(ws + tb);
    to_device(table, ch.data(), sizeof(cuda::OptChunk) * ch.size());
    cuda::sum_squares(partial, x, table, int(ch.size()), stream_);
    std::vector<double> part(ch.size());
    to_host(part.data(), partial, sizeof(double) * part.size());
    double s = 0;
    for (const double v : part) s += v;  // chunk order: fixed
    return s;
  }

  void adamw_step(float* p, const float* g, float* m, float* v, const std::vector<ArenaSpan>& spans,
                  const AdamWStep& k) override {
    train_check::spans(name(), "adamw_step", spans);
    const std::vector<cuda::OptChunk> ch = opt_chunks(spans);
    if (ch.empty()) return;
    auto* table = static_cast<cuda::OptChunk*>(workspace(sizeof(cuda::OptChunk) * ch.size()));
    to_device(table, ch.data(), sizeof(cuda::OptChunk) * ch.size());
    cuda::adamw_step(p, g, m, v, table, int(ch.size()), k.lr, k.beta1, k.beta2, k.eps, k.inv_bc1, k.inv_bc2,
                     k.grad_scale, stream_);
  }

 private:
  static std::vector<cuda::OptChunk> opt_chunks(const std::vector<ArenaSpan>& spans) {
    std::vector<cuda::OptChunk> ch;
    for (const ArenaSpan& sp : spans)
      for (int64_t k = 0; k < sp.n; k += cuda::kOptChunk)
        ch.push_back({sp.offset + k, int32_t(std::min<int64_t>(cuda::kOptChunk, sp.n - k)), sp.weight_decay});
    return ch;
  }
  void free_deferred() {
    for (void* p : deferred_) cudaFreeAsync(p, stream_);
    deferred_.clear();
  }
  bool capturing() const {
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    HM_CUDA_OK(cudaStreamIsCapturing(stream_, &cs), "cudaStreamIsCapturing");
    return cs != cudaStreamCaptureStatusNone;
  }
  cuda::Blas& blas() {
    if (!blas_) blas_ = std::make_unique<cuda::Blas>();
    return *blas_;
  }
  // The op workspace, grown to `bytes` when needed (never during a capture).
  void* workspace(size_t bytes) {
    if (bytes == 0) return nullptr;
    reserve_workspace(bytes);
    return ws_;
  }

  static void check_kv_pool(const char* op, const KvPool& kv) {
    HM_CHECK(kv.k != nullptr && kv.v != nullptr && kv.row > 0 && kv.max_ctx > 0 &&
                 kv.slot_stride >= int64_t(kv.max_ctx) * kv.row,
             "cuda ", op, ": bad KV pool (row ", kv.row, ", max_ctx ", kv.max_ctx, ", slot_stride ", kv.slot_stride,
             ")");
  }
  // Calls f with the kernels' typed pool for kv.dtype (checked: f32, bf16 or f16).
  template <class F>
  static void dispatch_kv(const KvPool& kv, F&& f) {
    if (kv.dtype == DType::F32) {
      f(cuda::KvPool<float>{static_cast<float*>(kv.k), static_cast<float*>(kv.v), kv.max_ctx, kv.slot_stride});
    } else if (kv.dtype == DType::BF16) {
      f(cuda::KvPool<bf16>{static_cast<bf16*>(kv.k), static_cast<bf16*>(kv.v), kv.max_ctx, kv.slot_stride});
    } else {
      f(cuda::KvPool<f16>{static_cast<f16*>(kv.k), static_cast<f16*>(kv.v), kv.max_ctx, kv.slot_stride});
    }
  }
  static void check_rows(const char* op, const Tensor& dst, const int32_t* dst_idx, const Tensor& src,
                         const int32_t* src_idx, int n) {
    check_view(op, "dst", dst, dst.rows, dst.cols);
    check_view(op, "src", src, src.rows, dst.cols);
    check_type(op, "src", src, dst.dtype);
    HM_CHECK(n >= 0, "cuda ", op, ": negative row count ", n);
    HM_CHECK(dst_idx || n <= dst.rows, "cuda ", op, ": ", n, " rows into dst of ", dst.rows, " without indices");
    HM_CHECK(src_idx || n <= src.rows, "cuda ", op, ": ", n, " rows from src of ", src.rows, " without indices");
  }

  int dev_ = 0;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::Gemm> gemm_;
  bool decode_kernels_ = decode_kernels_default();
  int dt_scan_seqs_ = dt_scan_seqs_default();
  const bool fold_bridge_ = fold_bridge_default();
  const bool norm_after_ = norm_after_default();
  const bool mamba2_step_ = mamba2_step_default();
  const int gemv_rows_ = gemv_rows_default();  // the most rows for the GEMV and the fused decode stages
  int skinny_min_rows_ = skinny_min_rows_default();
  bool inv_ = false;  // set_batch_invariant
  bool fallback_only_ = false;
  void* ws_ = nullptr;
  size_t ws_bytes_ = 0;
  std::vector<void*> retired_;  // outgrown workspaces, freed with the backend
  cudaMemPool_t pool_ = nullptr;  // the device's default pool (alloc/free)
  std::vector<void*> deferred_;   // freed during a capture, returned to the pool after it
  std::vector<cuda::Span> span_list_;  // copy_many's list, kept for its capacity
  std::unique_ptr<cuda::Blas> blas_;
  std::unordered_map<void*, size_t> sizes_;  // alloc's blocks, for allocated_bytes
  size_t live_ = 0, peak_ = 0;  // the training ops' GEMMs (kernels/cuda/grad.h), made on first use
};

}  // namespace

bool cuda_available_impl() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) cudaGetLastError();
  return e == cudaSuccess && n > 0;
}

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackendImpl>(); }

}  // namespace hm
