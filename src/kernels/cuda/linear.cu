// cuBLASLt matmul for the Linear layers (linear.h).
//
// Row-major y[m,n] = x[m,k] . W[n,k]^T is, read column-major, Y (n x m) = W^T . X with W a
// k x n matrix (ld ldw) transposed and X a k x m matrix (ld ldx): one Lt matmul with
// TRANSA = T, no copies. alpha 1, beta 0 or 1 (accumulate).
#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <string>
#include <utility>
#include <tuple>

#include "core/error.h"
#include "kernels/cuda/linear.h"

#define HM_CUBLAS_OK(call, what)                                                                \
  do {                                                                                          \
    const cublasStatus_t hm_st_ = (call);                                                       \
    HM_CHECK(hm_st_ == CUBLAS_STATUS_SUCCESS, "cuda linear: ", what, ": ",                      \
             cublasLtGetStatusString(hm_st_));                                                  \
  } while (0)

namespace hm::cuda {
namespace {

// The largest power of two (up to 256) that divides the address: cuBLASLt picks kernels by it.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

size_t type_bytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

// The checks both entry points share, and the products with nothing to compute: true when done
// (an empty output, or k = 0: C = 0, or unchanged when accumulating).
bool checked_trivial(const char* who, void* C, cudaDataType_t tc, int64_t ldc, cudaDataType_t tin, int m, int n,
                     int k, bool accumulate, cudaStream_t stream) {
  HM_CHECK(tin == CUDA_R_32F || tin == CUDA_R_16BF || tin == CUDA_R_16F, who, ": input type ", int(tin),
           " is not f32, bf16 or f16");
  HM_CHECK(tc == tin || tc == CUDA_R_32F, who, ": output type ", int(tc), " must be the input's or f32");
  HM_CHECK(m >= 0 && n >= 0 && k >= 0, who, ": negative shape m ", m, " n ", n, " k ", k);
  if (m == 0 || n == 0) return true;
  if (k > 0) return false;
  if (!accumulate) {
    const size_t es = type_bytes(tc);
    const cudaError_t e = cudaMemset2DAsync(C, size_t(ldc) * es, 0, size_t(n) * es, size_t(m), stream);
    HM_CHECK(e == cudaSuccess, who, ": cudaMemset2DAsync: ", cudaGetErrorString(e));
  }
  return true;
}

// The drop bound of the plan cache: prefill chunks of many lengths must not grow it forever.
constexpr size_t kMaxPlans = 512;

using Key = std::tuple<int, int, int, int64_t, int64_t, int64_t, int, int, uint32_t, uint32_t, uint32_t>;
// A general product's key: m, n, k, lda, ldb, ldc, transposes (ta | tb << 1), tin, tc, and the
// alignments of A, B, C.
using GKey = std::tuple<int, int, int, int64_t, int64_t, int64_t, int, int, int, uint32_t, uint32_t, uint32_t>;

// The size whose algorithm a dimension borrows: itself when small or a multiple of 256 (weights,
// batches of whole sequences), else rounded up to 1/8 of its power of two (8,213 -> 8,704). Token
// counts that change every call (True Hybrid's paths, prefill chunks of a server) then share one
// heuristic query per bucket instead of paying one (about a millisecond) per new count.
// On by default since stop 38 (a True Hybrid training step 129.6 -> 58.7 ms with the training
// products through cuBLASLt, the seed's unchanged, H100); HM_CUDA_GEMM_BUCKETS=0 queries every
// exact shape.
bool buckets_on() {
  static const bool on = [] {
    const char* v = std::getenv("HM_CUDA_GEMM_BUCKETS");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

int bucket(int v) {
  if (v <= 128 || v % 256 == 0) return v;
  int g = 1;
  while (g * 2 <= v) g *= 2;
  g /= 8;
  return (v + g - 1) / g * g;
}

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulHeuristicResult_t algo{};
  bool lt_ok = false;  // the heuristic returned an algorithm and cuBLASLt has not rejected it
  void destroy() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

struct Gemm::Impl {
  cublasLtHandle_t lt = nullptr;
  cublasHandle_t blas = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  std::map<Key, Plan> inv_plans;  // batch-invariant mode: per shape, with the algorithm of fixed_algos
  std::map<Key, cublasLtMatmulAlgo_t> fixed_algos;  // batch-invariant mode: per shape with m = 0
  std::map<GKey, Plan> gplans;                      // general products (Gemm::gemm), per exact shape
  std::map<GKey, std::pair<bool, cublasLtMatmulAlgo_t>> rep_algos;  // per bucketed shape

  ~Impl() {
    drop_plans();
    if (blas) cublasDestroy(blas);
    if (lt) cublasLtDestroy(lt);
    if (ws) cudaFree(ws);
  }
  void drop_plans() {
    for (auto& kv : inv_plans) kv.second.destroy();
    inv_plans.clear();
    for (auto& kv : gplans) kv.second.destroy();
    gplans.clear();
  }

  // The descriptors of one shape (no algorithm yet).
  static void describe(Plan& p, cudaDataType_t ty, int64_t ldy, int64_t ldx, int64_t ldw, cudaDataType_t tin,
                       int m, int n, int k) {
    try {
      HM_CUBLAS_OK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
      const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      HM_CUBLAS_OK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "TRANSA");
      HM_CUBLAS_OK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "TRANSB");
      HM_CUBLAS_OK(cublasLtMatrixLayoutCreate(&p.a, tin, uint64_t(k), uint64_t(n), ldw), "layout W");
      HM_CUBLAS_OK(cublasLtMatrixLayoutCreate(&p.b, tin, uint64_t(k), uint64_t(m), ldx), "layout x");
      HM_CUBLAS_OK(cublasLtMatrixLayoutCreate(&p.c, ty, uint64_t(n), uint64_t(m), ldy), "layout y");
    } catch (...) {
      p.destroy();
      throw;
    }
  }

  // The descriptors of the general product C [m,n] = op(A) [m,k] . op(B) [k,n] (row-major), as the
  // column-major C^T = op(B)^T op(A)^T: cuBLASLt's A is our B, its B our A.
  static void describe_general(Plan& p, bool ta, bool tb, cudaDataType_t tin, cudaDataType_t tc, int m, int n, int k,
                               int64_t lda, int64_t ldb, int64_t ldc) {
    try {
      HM_CUBLAS_OK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
      const cublasOperation_t oa = tb ? CUBLAS_OP_T : CUBLAS_OP_N, ob = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
      HM_CUBLAS_OK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &oa, sizeof oa), "TRANSA");
      HM_CUBLAS_OK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &ob, sizeof ob), "TRANSB");
      HM_CUBLAS_OK(cublasLtMatrixLayoutCreate(&p.a, tin, uint64_t(tb ? k : n), uint64_t(tb ? n : k), ldb), "layout B");
      HM_CUBLAS_OK(cublasLtMatrixLayoutCreate(&p.b, tin, uint64_t(ta ? m : k), uint64_t(ta ? k : m), lda), "layout A");
      HM_CUBLAS_OK(cublasLtMatrixLayoutCreate(&p.c, tc, uint64_t(n), uint64_t(m), ldc), "layout C");
    } catch (...) {
      p.destroy();
      throw;
    }
  }

  // The heuristic's first algorithm for plan p (its descriptors made), with split-K parts reduced
  // in float and the pointers' alignments; false when it offers none within the workspace.
  bool heuristic(Plan& p, uint32_t al_a, uint32_t al_b, uint32_t al_c, cublasLtMatmulHeuristicResult_t& out) {
    cublasLtMatmulPreference_t pref = nullptr;
    if (cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS) return false;
    const uint64_t wsb = ws_bytes;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    // Split-K partial sums stay float: a reduction in a bf16/f16 output type would round each part.
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_INPLACE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof schemes);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c);
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt, p.op, p.a, p.b, p.c, p.c, pref, 1, &out, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    return st == CUBLAS_STATUS_SUCCESS && found > 0 && out.workspaceSize <= ws_bytes;
  }

  // A general plan. The algorithm is the one the heuristic gives the problem with every dimension
  // at its bucket (cached per bucket), if cuBLASLt accepts it for the exact problem; else the
  // heuristic's for the exact problem. Either way a function of the shape alone, not of the order
  // shapes came in, so reruns and resumed runs pick the same kernels.
  Plan make_general_plan(bool ta, bool tb, cudaDataType_t tin, cudaDataType_t tc, int m, int n, int k, int64_t lda,
                         int64_t ldb, int64_t ldc, uint32_t al_a, uint32_t al_b, uint32_t al_c) {
    Plan p;
    describe_general(p, ta, tb, tin, tc, m, n, k, lda, ldb, ldc);
    const int mb = bucket(m), nb = bucket(n), kb = bucket(k);
    if (buckets_on() && (mb != m || nb != n || kb != k)) {
      // Leading dimensions at least the bucketed rows of each column-major operand.
      const int64_t la = std::max<int64_t>(lda, ta ? mb : kb), lb = std::max<int64_t>(ldb, tb ? kb : nb),
                    lc = std::max<int64_t>(ldc, nb);
      const GKey rk{mb, nb, kb, la, lb, lc, int(ta) | int(tb) << 1, int(tin), int(tc), al_a, al_b, al_c};
      auto it = rep_algos.find(rk);
      if (it == rep_algos.end()) {
        if (rep_algos.size() >= kMaxPlans) rep_algos.clear();
        Plan r;
        describe_general(r, ta, tb, tin, tc, mb, nb, kb, la, lb, lc);
        cublasLtMatmulHeuristicResult_t h{};
        const bool ok = heuristic(r, al_b, al_a, al_c, h);
        r.destroy();
        it = rep_algos.emplace(rk, std::pair<bool, cublasLtMatmulAlgo_t>{ok, h.algo}).first;
      }
      if (it->second.first) {
        cublasLtMatmulHeuristicResult_t res{};
        if (cublasLtMatmulAlgoCheck(lt, p.op, p.a, p.b, p.c, p.c, &it->second.second, &res) == CUBLAS_STATUS_SUCCESS &&
            res.workspaceSize <= ws_bytes) {
          p.algo = res;
          p.algo.algo = it->second.second;
          p.lt_ok = true;
          return p;
        }
      }
    }
    // No algorithm (an odd leading dimension or alignment) is not an error: cublasGemmEx runs it.
    p.lt_ok = heuristic(p, al_b, al_a, al_c, p.algo);
    return p;
  }

  // Batch-invariant mode: the algorithm of the shape with kInvariantRefRows rows, split-K off,
  // the first of the heuristic's candidates that accepts that; then checked for this m.
  Plan make_invariant_plan(const Key& key0, cudaDataType_t ty, int64_t ldy, uint32_t al_y, int64_t ldx,
                           uint32_t al_x, int64_t ldw, uint32_t al_w, cudaDataType_t tin, int m, int n, int k) {
    auto it = fixed_algos.find(key0);
    if (it == fixed_algos.end()) {
      Plan ref;
      describe(ref, ty, ldy, ldx, ldw, tin, Gemm::kInvariantRefRows, n, k);
      cublasLtMatmulPreference_t pref = nullptr;
      cublasLtMatmulHeuristicResult_t cand[16] = {};
      int found = 0;
      if (cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS) {
        const uint64_t wsb = ws_bytes;
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_w, sizeof al_w);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_x, sizeof al_x);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_y, sizeof al_y);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_y, sizeof al_y);
        if (cublasLtMatmulAlgoGetHeuristic(lt, ref.op, ref.a, ref.b, ref.c, ref.c, pref, 16, cand, &found) !=
            CUBLAS_STATUS_SUCCESS)
          found = 0;
        cublasLtMatmulPreferenceDestroy(pref);
      }
      bool ok = false;
      cublasLtMatmulAlgo_t algo{};
      for (int i = 0; i < found && !ok; ++i) {
        algo = cand[i].algo;
        const int32_t one = 1;
        const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
        cublasLtMatmulHeuristicResult_t r{};
        ok = cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one, sizeof one) ==
                 CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &none,
                                                  sizeof none) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulAlgoCheck(lt, ref.op, ref.a, ref.b, ref.c, ref.c, &algo, &r) == CUBLAS_STATUS_SUCCESS &&
             r.workspaceSize <= ws_bytes;
      }
      ref.destroy();
      HM_CHECK(ok, "cuda linear (batch-invariant): cuBLASLt offers no algorithm without split-K for n ", n, " k ",
               k, " (", found, " candidates)");
      it = fixed_algos.emplace(key0, algo).first;
    }
    Plan p;
    describe(p, ty, ldy, ldx, ldw, tin, m, n, k);
    p.algo.algo = it->second;
    cublasLtMatmulHeuristicResult_t r{};
    const cublasStatus_t st = cublasLtMatmulAlgoCheck(lt, p.op, p.a, p.b, p.c, p.c, &p.algo.algo, &r);
    if (st != CUBLAS_STATUS_SUCCESS || r.workspaceSize > ws_bytes) {
      p.destroy();
      HM_CHECK(false, "cuda linear (batch-invariant): the fixed algorithm of n ", n, " k ", k,
               " does not run m ", m, " (", cublasLtGetStatusString(st), ")");
    }
    p.algo.workspaceSize = r.workspaceSize;
    p.lt_ok = true;
    return p;
  }

};

Gemm::Gemm(size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
  HM_CUBLAS_OK(cublasLtCreate(&impl_->lt), "cublasLtCreate");
  HM_CUBLAS_OK(cublasCreate(&impl_->blas), "cublasCreate");
  const cudaError_t e = cudaMalloc(&impl_->ws, workspace_bytes);
  HM_CHECK(e == cudaSuccess, "cuda linear: cudaMalloc of the ", workspace_bytes, "-byte cuBLAS workspace: ",
           cudaGetErrorString(e));
  impl_->ws_bytes = workspace_bytes;
  HM_CUBLAS_OK(cublasSetWorkspace(impl_->blas, impl_->ws, workspace_bytes), "cublasSetWorkspace");
  // The fallback likewise reduces split-K parts in float, never in a 16-bit output type.
  HM_CUBLAS_OK(cublasSetMathMode(impl_->blas, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION),
               "cublasSetMathMode");
}

Gemm::~Gemm() = default;

size_t Gemm::cached_plans() const { return impl_->gplans.size(); }

void Gemm::linear(void* y, cudaDataType_t ty, int64_t ldy, const void* x, int64_t ldx, const void* W,
                  int64_t ldw, cudaDataType_t tin, int m, int n, int k, bool accumulate,
                  cudaStream_t stream) {
  HM_CHECK(ldx >= k && ldw >= k && ldy >= n, "cuda linear: leading dimensions ldx ", ldx, " ldw ", ldw, " ldy ",
           ldy, " below k ", k, " / n ", n);
  if (checked_trivial("cuda linear", y, ty, ldy, tin, m, n, k, accumulate, stream)) return;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  if (invariant_) {
    const uint32_t al_y = alignment(y), al_x = alignment(x), al_w = alignment(W);
    const Key key{m, n, k, ldx, ldw, ldy, int(tin), int(ty), al_x, al_w, al_y};
    auto it = impl_->inv_plans.find(key);
    if (it == impl_->inv_plans.end()) {
      if (impl_->inv_plans.size() >= kMaxPlans) impl_->drop_plans();
      const Key key0{0, n, k, ldx, ldw, ldy, int(tin), int(ty), al_x, al_w, al_y};
      it = impl_->inv_plans
               .emplace(key, impl_->make_invariant_plan(key0, ty, ldy, al_y, ldx, al_x, ldw, al_w, tin, m, n, k))
               .first;
    }
    const Plan& p = it->second;
    HM_CUBLAS_OK(cublasLtMatmul(impl_->lt, p.op, &alpha, W, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo.algo,
                                impl_->ws, p.algo.workspaceSize, stream),
                 "cublasLtMatmul (batch-invariant, m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
                     std::to_string(k) + ")");
    return;
  }
  // y = x W^T is the general product with A = x and B = W transposed.
  gemm(y, ty, ldy, x, ldx, false, W, ldw, true, tin, m, n, k, accumulate, stream);
}

void Gemm::gemm(void* C, cudaDataType_t tc, int64_t ldc, const void* A, int64_t lda, bool ta, const void* B,
                int64_t ldb, bool tb, cudaDataType_t tin, int m, int n, int k, bool accumulate, cudaStream_t stream) {
  if (checked_trivial("cuda gemm", C, tc, ldc, tin, m, n, k, accumulate, stream)) return;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  if (use_lt_) {
    const uint32_t al_a = alignment(A), al_b = alignment(B), al_c = alignment(C);
    const GKey key{m, n, k, lda, ldb, ldc, int(ta) | int(tb) << 1, int(tin), int(tc), al_a, al_b, al_c};
    auto it = impl_->gplans.find(key);
    if (it == impl_->gplans.end()) {
      if (impl_->gplans.size() >= kMaxPlans) impl_->drop_plans();
      it = impl_->gplans
               .emplace(key, impl_->make_general_plan(ta, tb, tin, tc, m, n, k, lda, ldb, ldc, al_a, al_b, al_c))
               .first;
    }
    Plan& p = it->second;
    if (p.lt_ok) {
      const cublasStatus_t st = cublasLtMatmul(impl_->lt, p.op, &alpha, B, p.a, A, p.b, &beta, C, p.c, C, p.c,
                                               &p.algo.algo, impl_->ws, p.algo.workspaceSize, stream);
      if (st == CUBLAS_STATUS_SUCCESS) return;
      HM_CHECK(st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE,
               "cuda gemm: cublasLtMatmul (m ", m, " n ", n, " k ", k, "): ", cublasLtGetStatusString(st));
      p.lt_ok = false;
    }
  }
  HM_CHECK(lda <= INT32_MAX && ldb <= INT32_MAX && ldc <= INT32_MAX,
           "cuda gemm: leading dimension over 2^31 for cublasGemmEx");
  ++fallbacks_;
  HM_CUBLAS_OK(cublasSetStream(impl_->blas, stream), "cublasSetStream");
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B goes first, no copies.
  HM_CUBLAS_OK(cublasGemmEx(impl_->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k,
                            &alpha, B, tin, int(ldb), A, tin, int(lda), &beta, C, tc, int(ldc), CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (m " + std::to_string(m) + " n " + std::to_string(n) + " k " + std::to_string(k) + ")");
}

}  // namespace hm::cuda
