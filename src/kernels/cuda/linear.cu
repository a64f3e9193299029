// cuBLASLt matmul for the Linear layers (linear.h).
//
// Row-major y[m,n] = x[m,k] . W[n,k]^T is, read column-major, Y (n x m) = W^T . X with W a
// k x n matrix (ld ldw) transposed and X a k x m matrix (ld ldx): one Lt matmul with
// TRANSA = T, no copies. alpha 1, beta 0 or 1 (accumulate).
#include <cublasLt.h>
#include <cublas_v2.h>

#include <map>
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

// The drop bound of the plan cache: prefill chunks of many lengths must not grow it forever.
constexpr size_t kMaxPlans = 512;

using Key = std::tuple<int, int, int, int64_t, int64_t, int64_t, int, int, uint32_t, uint32_t, uint32_t>;

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
  std::map<Key, Plan> plans;      // per shape (m included)
  std::map<Key, Plan> inv_plans;  // batch-invariant mode: per shape, with the algorithm of fixed_algos
  std::map<Key, cublasLtMatmulAlgo_t> fixed_algos;  // batch-invariant mode: per shape with m = 0

  ~Impl() {
    drop_plans();
    if (blas) cublasDestroy(blas);
    if (lt) cublasLtDestroy(lt);
    if (ws) cudaFree(ws);
  }
  void drop_plans() {
    for (auto& kv : plans) kv.second.destroy();
    plans.clear();
    for (auto& kv : inv_plans) kv.second.destroy();
    inv_plans.clear();
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

  Plan make_plan(cudaDataType_t ty, int64_t ldy, uint32_t al_y, int64_t ldx, uint32_t al_x, int64_t ldw,
                 uint32_t al_w, cudaDataType_t tin, int m, int n, int k) {
    Plan p;
    describe(p, ty, ldy, ldx, ldw, tin, m, n, k);
    cublasLtMatmulPreference_t pref = nullptr;
    if (cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS) return p;  // lt_ok false: the fallback runs
    const uint64_t wsb = ws_bytes;
    const uint32_t al_c = al_y;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    // Split-K partial sums stay float: a reduction in a bf16/f16 output type would round each part.
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_INPLACE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof schemes);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_w, sizeof al_w);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_x, sizeof al_x);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c);
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt, p.op, p.a, p.b, p.c, p.c, pref, 1, &p.algo, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    // No algorithm (an odd leading dimension or alignment) is not an error: cublasGemmEx runs it.
    p.lt_ok = st == CUBLAS_STATUS_SUCCESS && found > 0 && p.algo.workspaceSize <= ws_bytes;
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

size_t Gemm::cached_plans() const { return impl_->plans.size(); }

void Gemm::linear(void* y, cudaDataType_t ty, int64_t ldy, const void* x, int64_t ldx, const void* W,
                  int64_t ldw, cudaDataType_t tin, int m, int n, int k, bool accumulate,
                  cudaStream_t stream) {
  HM_CHECK(tin == CUDA_R_32F || tin == CUDA_R_16BF || tin == CUDA_R_16F,
           "cuda linear: input type ", int(tin), " is not f32, bf16 or f16");
  HM_CHECK(ty == tin || ty == CUDA_R_32F, "cuda linear: output type ", int(ty), " must be the input's or f32");
  HM_CHECK(m >= 0 && n >= 0 && k >= 0, "cuda linear: negative shape m ", m, " n ", n, " k ", k);
  HM_CHECK(ldx >= k && ldw >= k && ldy >= n, "cuda linear: leading dimensions ldx ", ldx, " ldw ", ldw, " ldy ",
           ldy, " below k ", k, " / n ", n);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: y = 0, or unchanged when accumulating
    if (!accumulate) {
      const size_t es = type_bytes(ty);
      const cudaError_t e = cudaMemset2DAsync(y, size_t(ldy) * es, 0, size_t(n) * es, size_t(m), stream);
      HM_CHECK(e == cudaSuccess, "cuda linear: cudaMemset2DAsync: ", cudaGetErrorString(e));
    }
    return;
  }
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
  if (use_lt_) {
    const uint32_t al_y = alignment(y), al_x = alignment(x), al_w = alignment(W);
    const Key key{m, n, k, ldx, ldw, ldy, int(tin), int(ty), al_x, al_w, al_y};
    auto it = impl_->plans.find(key);
    if (it == impl_->plans.end()) {
      if (impl_->plans.size() >= kMaxPlans) impl_->drop_plans();
      it = impl_->plans.emplace(key, impl_->make_plan(ty, ldy, al_y, ldx, al_x, ldw, al_w, tin, m, n, k)).first;
    }
    Plan& p = it->second;
    if (p.lt_ok) {
      const cublasStatus_t st = cublasLtMatmul(impl_->lt, p.op, &alpha, W, p.a, x, p.b, &beta, y, p.c, y, p.c,
                                               &p.algo.algo, impl_->ws, p.algo.workspaceSize, stream);
      if (st == CUBLAS_STATUS_SUCCESS) return;
      // Rejected at launch (not an asynchronous failure): remember it and use the fallback.
      HM_CHECK(st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE,
               "cuda linear: cublasLtMatmul (m ", m, " n ", n, " k ", k, "): ", cublasLtGetStatusString(st));
      p.lt_ok = false;
    }
  }
  HM_CHECK(ldx <= INT32_MAX && ldw <= INT32_MAX && ldy <= INT32_MAX,
           "cuda linear: leading dimension over 2^31 for cublasGemmEx");
  ++fallbacks_;
  HM_CUBLAS_OK(cublasSetStream(impl_->blas, stream), "cublasSetStream");
  HM_CUBLAS_OK(cublasGemmEx(impl_->blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, W, tin, int(ldw), x, tin,
                            int(ldx), &beta, y, ty, int(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (m " + std::to_string(m) + " n " + std::to_string(n) + " k " + std::to_string(k) + ")");
}

}  // namespace hm::cuda
