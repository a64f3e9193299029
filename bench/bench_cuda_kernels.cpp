// Micro-benchmark of the CUDA Mamba-1 kernels (docs/CUDA.md): the selective scan prefill at the
// peer's shape (B 8, D 2048, L 2048, N 16, bf16; mamba_ssm: 0.59 ms, ../shared/peers/README.md)
// and at batch 1, swept over chunk lengths; the decode steps of scan and conv at batch 1-64;
// attention prefill (TFLOP/s against PyTorch SDPA) and split-KV decode (fraction of HBM); the
// training scan (forward + backward against the prefill) and conv at B 8, E 1536, L 2048.
// Bandwidth is bytes that must move (each input read once, each output written once, the
// state read and written) over the median time, and its fraction of a device-to-device copy
// measured in the same run. Times are CUDA events around back-to-back launches (no graph).
// Last, the decode projections of the 1.4B shape at 1, 16 and 64 rows: the skinny GEMM
// (kernels/cuda/skinny.h) against cuBLASLt and, at one row, the GEMV, with the bytes floor.
// `hm_bench_cuda_kernels skinny` runs that part alone (`skinny-plans`: every tiling of it);
// `hm_bench_cuda_kernels attn-train` the training attention (forward and backward TFLOP/s at
// B 8, L 2048) alone; `copy-spans` the prefix-cache restore's copies alone.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/decode.h"
#include "kernels/cuda/grad.h"
#include "kernels/cuda/linear.h"
#include "kernels/cuda/mamba_grad.h"
#include "kernels/cuda/rows.h"
#include "kernels/cuda/sampling.h"
#include "kernels/cuda/skinny.h"

namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "bench_cuda_kernels: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

template <class T> T to_t(float v);
template <> float to_t<float>(float v) { return v; }
template <> __nv_bfloat16 to_t<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __half to_t<__half>(float v) { return __float2half_rn(v); }
template <class T> const char* type_name();
template <> const char* type_name<float>() { return "f32"; }
template <> const char* type_name<__nv_bfloat16>() { return "bf16"; }
template <> const char* type_name<__half>() { return "f16"; }

// Device array of n random values in [lo, hi) (never zeros: METHOD.md).
template <class T>
T* random_dev(size_t n, float lo, float hi, uint64_t seed) {
  std::vector<T> h(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& v : h) {
    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
    v = to_t<T>(lo + (hi - lo) * float(s >> 40) * 0x1.0p-24f);
  }
  T* p = nullptr;
  ck(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  ck(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return p;
}

// Median over `reps` of the time of `per` back-to-back calls of f(rep), in ms per call.
template <class F>
double time_ms(F f, int reps = 15, int per = 1) {
  cudaEvent_t a, b;
  ck(cudaEventCreate(&a), "event");
  ck(cudaEventCreate(&b), "event");
  for (int i = 0; i < 3; ++i) f(i);  // warm-up
  std::vector<float> ms;
  for (int r = 0; r < reps; ++r) {
    ck(cudaEventRecord(a), "record");
    for (int i = 0; i < per; ++i) f(r * per + i);
    ck(cudaEventRecord(b), "record");
    ck(cudaEventSynchronize(b), "sync");
    float t = 0;
    ck(cudaEventElapsedTime(&t, a, b), "elapsed");
    ms.push_back(t / float(per));
  }
  ck(cudaGetLastError(), "launch");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Device-to-device copy of 2 GiB: bytes read + written over time (METHOD.md's ceiling).
double copy_gbs() {
  const size_t bytes = size_t(1) << 31;
  void *src = nullptr, *dst = nullptr;
  ck(cudaMalloc(&src, bytes), "cudaMalloc");
  ck(cudaMalloc(&dst, bytes), "cudaMalloc");
  ck(cudaMemset(src, 1, bytes), "memset");
  const double ms = time_ms([&](int) { ck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice), "copy"); }, 10);
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
}

// Enough copies of the inputs that rotating through them overflows the 60 MB L2 several times.
int sets_for(size_t bytes_per_set) {
  return int(std::clamp<size_t>((size_t(400) << 20) / std::max<size_t>(bytes_per_set, 1), 1, 16));
}

template <class T>
struct ScanInputs {
  T *xz, *dt, *dbc, *y;
};

template <class T>
void bench_scan(int nseq, int E, int L, int N, double hbm, double peer_ms) {
  const int T_ = nseq * L, R = (E / 2 + 15) / 16, P = R + 2 * N;
  const size_t set_bytes = size_t(T_) * (2 * E + E + P + E) * sizeof(T);
  const int sets = sets_for(set_bytes);
  std::vector<ScanInputs<T>> in(static_cast<size_t>(sets));
  for (int i = 0; i < sets; ++i)
    in[size_t(i)] = {random_dev<T>(size_t(T_) * 2 * E, -1.f, 1.f, 10 * i + 1), random_dev<T>(size_t(T_) * E, -1.f, 1.f, 10 * i + 2),
                     random_dev<T>(size_t(T_) * P, -1.f, 1.f, 10 * i + 3), random_dev<T>(size_t(T_) * E, -1.f, 1.f, 10 * i + 4)};
  T* dt_bias = random_dev<T>(size_t(E), -4.f, -2.f, 5);
  T* Dskip = random_dev<T>(size_t(E), 0.5f, 1.5f, 6);
  float* A = random_dev<float>(size_t(E) * N, -8.f, -0.5f, 7);
  float* state = random_dev<float>(size_t(nseq) * E * N, -1.f, 1.f, 8);
  std::vector<int32_t> cu(size_t(nseq) + 1), slots(static_cast<size_t>(nseq)), pos0(static_cast<size_t>(nseq), 0);
  for (int s = 0; s <= nseq; ++s) cu[size_t(s)] = s * L;
  for (int s = 0; s < nseq; ++s) slots[size_t(s)] = s;
  int32_t *dcu, *dslots, *dpos;
  ck(cudaMalloc(&dcu, cu.size() * 4), "cudaMalloc");
  ck(cudaMalloc(&dslots, slots.size() * 4), "cudaMalloc");
  ck(cudaMalloc(&dpos, pos0.size() * 4), "cudaMalloc");
  ck(cudaMemcpy(dcu, cu.data(), cu.size() * 4, cudaMemcpyHostToDevice), "upload");
  ck(cudaMemcpy(dslots, slots.data(), slots.size() * 4, cudaMemcpyHostToDevice), "upload");
  ck(cudaMemcpy(dpos, pos0.data(), pos0.size() * 4, cudaMemcpyHostToDevice), "upload");
  hm::cuda::RaggedBatch rb{dcu, dslots, dpos, nseq, T_, L};
  // x, dt, z read and y written [T, E]; B, C read [T, N]; the state read and written.
  const double bytes = double(T_) * (4.0 * E + 2.0 * N) * sizeof(T) + 2.0 * nseq * E * N * sizeof(float);
  const int chunk_auto = hm::cuda::scan_chunk_auto(rb, E);
  for (int chunk : {0, 64, 128, 256, 512, 1024, 1 << 20}) {
    const int c = chunk ? chunk : chunk_auto;
    void* ws = nullptr;
    const size_t wsb = hm::cuda::selective_scan_workspace_bytes(rb, E, N, c);
    if (wsb) ck(cudaMalloc(&ws, wsb), "cudaMalloc ws");
    const double ms = time_ms([&](int i) {
      const ScanInputs<T>& s = in[size_t(i % sets)];
      hm::cuda::selective_scan<T>(s.y, E, state, s.xz, 2 * E, s.dt, E, dt_bias, A, s.dbc + R, s.dbc + R + N, P,
                                  Dskip, s.xz + E, 2 * E, rb, E, N, c, ws, nullptr);
    });
    const double gbs = bytes / (ms * 1e-3) / 1e9;
    char chunk_s[32];
    std::snprintf(chunk_s, sizeof chunk_s, "%s%d", chunk ? "" : "auto ", std::min(c, L));
    std::printf("scan prefill  %-4s B %-2d E %-4d L %-4d N %-2d chunk %-9s %8.4f ms %7.0f GB/s %5.1f%% HBM",
                type_name<T>(), nseq, E, L, N, chunk_s, ms, gbs, 100.0 * gbs / hbm);
    if (peer_ms > 0) std::printf("  peer %.2f ms: %.2fx", peer_ms, peer_ms / ms);
    std::printf("\n");
    if (ws) cudaFree(ws);
  }
  // The causal conv prefill on the same rows (x read, out written; the peer's: 0.07 ms at B 8).
  {
    const int K = 4;
    T* w = random_dev<T>(size_t(E) * K, -0.5f, 0.5f, 9);
    float* conv_state = random_dev<float>(size_t(nseq) * E * (K - 1), -1.f, 1.f, 10);
    const double ms = time_ms([&](int i) {
      const ScanInputs<T>& s = in[size_t(i % sets)];
      hm::cuda::conv1d_silu<T>(s.y, E, conv_state, s.xz, 2 * E, w, dt_bias, rb, E, K, nullptr);
    });
    const double gbs = 2.0 * T_ * E * sizeof(T) / (ms * 1e-3) / 1e9;
    std::printf("conv prefill  %-4s B %-2d E %-4d L %-4d K %d %23s %8.4f ms %7.0f GB/s %5.1f%% HBM\n", type_name<T>(),
                nseq, E, L, K, "", ms, gbs, 100.0 * gbs / hbm);
    cudaFree(w);
    cudaFree(conv_state);
  }
  for (auto& s : in) {
    cudaFree(s.xz); cudaFree(s.dt); cudaFree(s.dbc); cudaFree(s.y);
  }
  cudaFree(dt_bias); cudaFree(Dskip); cudaFree(A); cudaFree(state);
  cudaFree(dcu); cudaFree(dslots); cudaFree(dpos);
}

// One decode step of nseq sequences: scan step and conv step, back to back (launch-bound at
// small batch; a CUDA graph of the whole step is what removes that).
template <class T>
void bench_step(int nseq, int E, int N, int K, double hbm) {
  const int R = (E / 2 + 15) / 16, P = R + 2 * N;
  T* xz = random_dev<T>(size_t(nseq) * 2 * E, -1.f, 1.f, 21);
  T* dt = random_dev<T>(size_t(nseq) * E, -1.f, 1.f, 22);
  T* dbc = random_dev<T>(size_t(nseq) * P, -1.f, 1.f, 23);
  T* y = random_dev<T>(size_t(nseq) * E, -1.f, 1.f, 24);
  T* dt_bias = random_dev<T>(size_t(E), -4.f, -2.f, 25);
  T* Dskip = random_dev<T>(size_t(E), 0.5f, 1.5f, 26);
  T* w = random_dev<T>(size_t(E) * K, -0.5f, 0.5f, 27);
  float* A = random_dev<float>(size_t(E) * N, -8.f, -0.5f, 28);
  float* ssm = random_dev<float>(size_t(nseq) * E * N, -1.f, 1.f, 29);
  float* conv = random_dev<float>(size_t(nseq) * E * (K - 1), -1.f, 1.f, 30);
  std::vector<int32_t> slots(static_cast<size_t>(nseq));
  for (int s = 0; s < nseq; ++s) slots[size_t(s)] = nseq - 1 - s;
  int32_t* dslots;
  ck(cudaMalloc(&dslots, slots.size() * 4), "cudaMalloc");
  ck(cudaMemcpy(dslots, slots.data(), slots.size() * 4, cudaMemcpyHostToDevice), "upload");
  const double ms_scan = time_ms([&](int) {
    hm::cuda::selective_scan_step<T>(y, E, ssm, dslots, xz, 2 * E, dt, E, dt_bias, A, dbc + R, dbc + R + N, P,
                                     Dskip, xz + E, 2 * E, nseq, E, N, nullptr);
  }, 15, 200);
  const double ms_conv = time_ms([&](int) {
    hm::cuda::conv1d_silu_step<T>(y, E, conv, dslots, xz, 2 * E, w, dt_bias, nseq, E, K, nullptr);
  }, 15, 200);
  const double scan_bytes = 2.0 * nseq * E * N * sizeof(float) + double(nseq) * (4.0 * E + 2 * N) * sizeof(T);
  const double conv_bytes = 2.0 * nseq * E * (K - 1) * sizeof(float) + double(nseq) * 2.0 * E * sizeof(T);
  std::printf("decode step   %-4s B %-2d E %-4d N %-2d  scan %6.2f us %6.0f GB/s %5.1f%% HBM   conv %6.2f us %6.0f GB/s\n",
              type_name<T>(), nseq, E, N, ms_scan * 1e3, scan_bytes / (ms_scan * 1e-3) / 1e9,
              100.0 * scan_bytes / (ms_scan * 1e-3) / 1e9 / hbm, ms_conv * 1e3, conv_bytes / (ms_conv * 1e-3) / 1e9);
  cudaFree(xz); cudaFree(dt); cudaFree(dbc); cudaFree(y); cudaFree(dt_bias); cudaFree(Dskip);
  cudaFree(w); cudaFree(A); cudaFree(ssm); cudaFree(conv); cudaFree(dslots);
}

// Device int32 array (the ragged batch's cu_seqlens, slots, pos0).
int32_t* upload_i32(const std::vector<int32_t>& h) {
  int32_t* p = nullptr;
  ck(cudaMalloc(&p, h.size() * 4), "cudaMalloc");
  ck(cudaMemcpy(p, h.data(), h.size() * 4, cudaMemcpyHostToDevice), "upload");
  return p;
}

// Training's Mamba ops (kernels/cuda/mamba_grad.h) on nseq sequences of L tokens: the scan's
// forward (saving a state every 64 tokens) and backward against the inference prefill scan at
// its auto chunk (issue 15 asks the backward to stay far under 5x that), then the conv's.
// Parameter gradients in float. Bytes: the backward reads x, dt, z, dy, B, C and writes dx, ddt,
// dz, dB, dC once each (its partial sums and recomputation are on top).
template <class T>
void bench_scan_train(int nseq, int E, int L, int N, double hbm) {
  const int T_ = nseq * L, K = 4;
  const size_t nE = size_t(T_) * E;
  T *x = random_dev<T>(nE, -1.f, 1.f, 41), *dt = random_dev<T>(nE, -1.f, 1.f, 42), *z = random_dev<T>(nE, -1.f, 1.f, 43);
  T *dy = random_dev<T>(nE, -1.f, 1.f, 44), *y = random_dev<T>(nE, -1.f, 1.f, 45);
  T *dx = random_dev<T>(nE, -1.f, 1.f, 46), *ddt = random_dev<T>(nE, -1.f, 1.f, 47), *dz = random_dev<T>(nE, -1.f, 1.f, 48);
  T *bc = random_dev<T>(size_t(T_) * 2 * N, -1.f, 1.f, 49), *dbc = random_dev<T>(size_t(T_) * 2 * N, -1.f, 1.f, 50);
  T *dt_bias = random_dev<T>(size_t(E), -4.f, -2.f, 51), *Dskip = random_dev<T>(size_t(E), 0.5f, 1.5f, 52);
  float* A_log = random_dev<float>(size_t(E) * N, -0.5f, 2.f, 53);
  float* A = random_dev<float>(size_t(E) * N, -8.f, -0.5f, 54);
  float *g_dtb = random_dev<float>(size_t(E), 0.f, 1.f, 55), *g_D = random_dev<float>(size_t(E), 0.f, 1.f, 56);
  float* g_A = random_dev<float>(size_t(E) * N, 0.f, 1.f, 57);
  float* state = random_dev<float>(size_t(nseq) * E * N, -1.f, 1.f, 58);
  std::vector<int32_t> cu(size_t(nseq) + 1), slots(static_cast<size_t>(nseq)), pos0(static_cast<size_t>(nseq), 0);
  for (int s = 0; s <= nseq; ++s) cu[size_t(s)] = s * L;
  for (int s = 0; s < nseq; ++s) slots[size_t(s)] = s;
  int32_t *dcu = upload_i32(cu), *dslots = upload_i32(slots), *dpos = upload_i32(pos0);
  const hm::cuda::RaggedBatch rb{dcu, dslots, dpos, nseq, T_, L};
  const hm::cuda::ScanTrainShape sh = hm::cuda::scan_train_shape(cu.data(), nseq, E, N, 0);
  void *saved = nullptr, *ws = nullptr;
  const size_t ws_bytes = std::max(hm::cuda::scan_train_workspace_bytes(sh, true),
                                   hm::cuda::selective_scan_workspace_bytes(rb, E, N, 0));
  ck(cudaMalloc(&saved, hm::cuda::scan_train_saved_bytes(sh)), "cudaMalloc saved");
  ck(cudaMalloc(&ws, ws_bytes), "cudaMalloc ws");
  hm::cuda::ScanTrainIn<T> in;
  in.x = x; in.ldx = E; in.dt = dt; in.lddt = E; in.z = z; in.ldz = E; in.dt_bias = dt_bias; in.Dskip = Dskip;
  in.B = bc; in.C = bc + N; in.ldbc = 2 * N; in.A_log = A_log; in.ldA = N; in.a_log_f32 = true;
  hm::cuda::ScanTrainGrad<T, float> gd;
  gd.dx = dx; gd.lddx = E; gd.ddt = ddt; gd.lddt = E; gd.dz = dz; gd.lddz = E;
  gd.dB = dbc; gd.dC = dbc + N; gd.lddB = gd.lddC = 2 * N;
  gd.ddt_bias = g_dtb; gd.dA_log = g_A; gd.lddA = N; gd.dDskip = g_D;
  const int chunk = hm::cuda::scan_chunk_auto(rb, E);
  const double ms_inf = time_ms([&](int) {
    hm::cuda::selective_scan<T>(y, E, state, x, E, dt, E, dt_bias, A, bc, bc + N, 2 * N, Dskip, z, E, rb, E, N, chunk,
                                ws, nullptr);
  });
  const double ms_fwd = time_ms([&](int) {
    hm::cuda::selective_scan_train<T>(y, E, static_cast<float*>(saved), in, rb, sh, ws, nullptr);
  });
  const double ms_bwd = time_ms([&](int) {
    hm::cuda::selective_scan_backward<T, float>(gd, dy, E, static_cast<const float*>(saved), in, rb, sh, ws, nullptr);
  });
  // The forward reads x, dt, z, B, C and writes y; the backward as above.
  const double fwd_bytes = double(T_) * (4.0 * E + 2.0 * N) * sizeof(T);
  const double bwd_bytes = double(T_) * (8.0 * E + 4.0 * N) * sizeof(T);
  std::printf("scan train    %-4s B %-2d E %-4d L %-4d N %-2d  prefill %.4f ms  train fwd %.4f ms (%.0f GB/s)  "
              "bwd %.4f ms (%.0f GB/s %4.1f%% HBM)  fwd+bwd %.2fx prefill  saved %.1f MB  workspace %.1f MB\n",
              type_name<T>(), nseq, E, L, N, ms_inf, ms_fwd, fwd_bytes / (ms_fwd * 1e-3) / 1e9, ms_bwd,
              bwd_bytes / (ms_bwd * 1e-3) / 1e9,
              100.0 * bwd_bytes / (ms_bwd * 1e-3) / 1e9 / hbm, (ms_fwd + ms_bwd) / ms_inf,
              double(hm::cuda::scan_train_saved_bytes(sh)) / 1e6, double(ws_bytes) / 1e6);
  {
    T* w = random_dev<T>(size_t(E) * K, -0.5f, 0.5f, 59);
    float* dw = random_dev<float>(size_t(E) * K, 0.f, 1.f, 60);
    void* cws = nullptr;
    ck(cudaMalloc(&cws, hm::cuda::conv1d_silu_backward_workspace_bytes(T_, E, K)), "cudaMalloc conv ws");
    const double ms_cf = time_ms([&](int) {
      hm::cuda::conv1d_silu_train<T>(y, E, x, E, w, K, dt_bias, rb, E, K, nullptr);
    });
    const double ms_cb = time_ms([&](int) {
      hm::cuda::conv1d_silu_backward<T, float>(dx, E, dw, K, g_D, dy, E, x, E, w, K, dt_bias, rb, E, K, cws, nullptr);
    });
    std::printf("conv train    %-4s B %-2d E %-4d L %-4d K %d   fwd %.4f ms (%.0f GB/s)  bwd %.4f ms (%.0f GB/s)\n",
                type_name<T>(), nseq, E, L, K, ms_cf, 2.0 * nE * sizeof(T) / (ms_cf * 1e-3) / 1e9, ms_cb,
                3.0 * nE * sizeof(T) / (ms_cb * 1e-3) / 1e9);
    cudaFree(w); cudaFree(dw); cudaFree(cws);
  }
  for (T* p : {x, dt, z, dy, y, dx, ddt, dz, bc, dbc, dt_bias, Dskip}) cudaFree(p);
  for (float* p : {A_log, A, g_dtb, g_D, g_A, state}) cudaFree(p);
  cudaFree(dcu); cudaFree(dslots); cudaFree(dpos); cudaFree(saved); cudaFree(ws);
}

// Attention over nseq sequences whose caches hold ctx keys each: prefill (every sequence's L =
// ctx rows from position 0, causal) or decode (one row at position ctx - 1). FLOPs count the
// two matrix products over the causal keys only (4 hd per query and key: PyTorch SDPA's
// convention for its 374 TFLOP/s at L 2048, hd 64); decode bytes are the K and V read.
template <class KV>
void bench_attention(bool prefill, int nseq, int ctx, int H, int G, int hd, double hbm) {
  using T = KV;
  const int L = prefill ? ctx : 1, width = G * hd;
  const size_t pool_elems = size_t(nseq) * ctx * width;
  const int sets = prefill ? 1 : sets_for(2 * pool_elems * sizeof(KV));
  std::vector<hm::cuda::KvPool<KV>> pools;
  for (int i = 0; i < sets; ++i)
    pools.push_back({random_dev<KV>(pool_elems, -1.f, 1.f, 40 + 2 * i), random_dev<KV>(pool_elems, -1.f, 1.f, 41 + 2 * i),
                     ctx, int64_t(ctx) * width});
  T* q = random_dev<T>(size_t(nseq) * L * H * hd, -1.f, 1.f, 39);
  T* out = random_dev<T>(size_t(nseq) * L * H * hd, -1.f, 1.f, 38);
  std::vector<int32_t> cu(size_t(nseq) + 1), slots(static_cast<size_t>(nseq)), pos0(static_cast<size_t>(nseq), prefill ? 0 : ctx - 1);
  for (int s = 0; s <= nseq; ++s) cu[size_t(s)] = s * L;
  for (int s = 0; s < nseq; ++s) slots[size_t(s)] = nseq - 1 - s;
  int32_t *dcu = upload_i32(cu), *dslots = upload_i32(slots), *dpos = upload_i32(pos0);
  const hm::cuda::RaggedBatch rb{dcu, dslots, dpos, nseq, nseq * L, L};
  const size_t wsb = hm::cuda::attention_workspace_bytes(rb, H, G, hd, ctx);
  void* ws = nullptr;
  if (wsb) ck(cudaMalloc(&ws, wsb), "cudaMalloc ws");
  const double ms = time_ms([&](int i) {
    hm::cuda::attention<T, KV>(out, H * hd, q, H * hd, pools[size_t(i % sets)], rb, H, G, hd, ctx, ws, nullptr);
  }, 15, prefill ? 1 : 50);
  const double keys = prefill ? double(ctx) * (ctx + 1) / 2 : double(ctx);  // per sequence and head
  const double tflops = 4.0 * nseq * H * hd * keys / (ms * 1e-3) / 1e12;
  if (prefill) {
    std::printf("attn prefill  %-4s B %-2d L %-5d H %-2d G %-2d hd %-3d %8.4f ms %7.1f TFLOP/s  (SDPA 374 at L 2048 hd 64: %.2fx)\n",
                type_name<T>(), nseq, ctx, H, G, hd, ms, tflops, tflops / 374.0);
  } else {
    const double gbs = 2.0 * pool_elems * sizeof(KV) / (ms * 1e-3) / 1e9;
    std::printf("attn decode   %-4s B %-2d ctx %-5d H %-2d G %-2d hd %-3d %8.2f us %7.2f TFLOP/s %6.0f GB/s %5.1f%% HBM\n",
                type_name<T>(), nseq, ctx, H, G, hd, ms * 1e3, tflops, gbs, 100.0 * gbs / hbm);
  }
  for (auto& p : pools) {
    cudaFree(p.k);
    cudaFree(p.v);
  }
  cudaFree(q); cudaFree(out); cudaFree(ws); cudaFree(dcu); cudaFree(dslots); cudaFree(dpos);
}

// Training attention (kernels/cuda/grad.h) on nseq causal sequences of L tokens, q, k, v as
// column views of one packed [tokens, (H + 2G) hd] matrix (as the fused projection leaves them):
// attention_train (out and lse) and attention_backward (D, dk/dv, dq). FLOPs over the causal
// pairs as the prefill's: forward 4 hd per (query, key, head), backward 2.5x that
// (flash-attention's convention: 5 products against 2; ours recomputes S and dP in its dq
// kernel, 7 products).
template <class T>
void bench_attention_train(int nseq, int L, int H, int G, int hd) {
  const int n = nseq * L, ldqkv = (H + 2 * G) * hd;
  T* qkv = random_dev<T>(size_t(n) * ldqkv, -1.f, 1.f, 70);
  T* out = random_dev<T>(size_t(n) * H * hd, -1.f, 1.f, 71);
  T* dout = random_dev<T>(size_t(n) * H * hd, -1.f, 1.f, 72);
  T* dqkv = random_dev<T>(size_t(n) * ldqkv, -1.f, 1.f, 73);
  float* lse = random_dev<float>(size_t(n) * H, 0.f, 1.f, 74);
  void* ws = nullptr;
  ck(cudaMalloc(&ws, std::max<size_t>(1, hm::cuda::attention_backward_workspace_bytes(n, H))), "cudaMalloc ws");
  std::vector<int32_t> cu(size_t(nseq) + 1), slots(static_cast<size_t>(nseq)), pos0(static_cast<size_t>(nseq), 0);
  for (int s = 0; s <= nseq; ++s) cu[size_t(s)] = s * L;
  for (int s = 0; s < nseq; ++s) slots[size_t(s)] = s;
  int32_t *dcu = upload_i32(cu), *dslots = upload_i32(slots), *dpos = upload_i32(pos0);
  const hm::cuda::RaggedBatch rb{dcu, dslots, dpos, nseq, n, L};
  const T *q = qkv, *k = qkv + size_t(H) * hd, *v = qkv + size_t(H + G) * hd;
  T *dq = dqkv, *dk = dqkv + size_t(H) * hd, *dv = dqkv + size_t(H + G) * hd;
  auto fwd = [&](int) { hm::cuda::attention_train<T>(out, H * hd, lse, H, q, ldqkv, k, ldqkv, v, ldqkv, rb, H, G, hd, nullptr); };
  const double ms_f = time_ms(fwd);
  fwd(0);  // out and lse of these inputs for the backward
  const double ms_b = time_ms([&](int) {
    hm::cuda::attention_backward<T>(dq, ldqkv, dk, ldqkv, dv, ldqkv, dout, H * hd, q, ldqkv, k, ldqkv, v, ldqkv, out,
                                    H * hd, lse, H, rb, H, G, hd, ws, nullptr);
  });
  const double flops = 4.0 * nseq * H * hd * (double(L) * (L + 1) / 2);
  std::printf("attn train    %-4s B %-2d L %-5d H %-2d G %-2d hd %-3d  fwd %8.4f ms %6.1f TFLOP/s  bwd %8.4f ms %6.1f "
              "TFLOP/s (2.5x fwd FLOPs)  fwd+bwd %.3f ms\n",
              type_name<T>(), nseq, L, H, G, hd, ms_f, flops / (ms_f * 1e-3) / 1e12, ms_b,
              2.5 * flops / (ms_b * 1e-3) / 1e12, ms_f + ms_b);
  cudaFree(qkv); cudaFree(out); cudaFree(dout); cudaFree(dqkv); cudaFree(lse); cudaFree(ws);
  cudaFree(dcu); cudaFree(dslots); cudaFree(dpos);
}

// Sampling a [B, V] batch of random logits (kernels/cuda/sampling.h): greedy, the CPU defaults
// (top-k 40, top-p 0.95, min-p 0.05) and top-p 0.95 alone (a wide nucleus: the bucket-order path).
void bench_sampling(int B, int V) {
  float* logits = random_dev<float>(size_t(B) * V, -4.f, 4.f, 60);
  const size_t pool_bytes = hm::cuda::sampler_pool_bytes(B, 64);
  void *pool_mem = nullptr, *ws = nullptr;
  int32_t* out = nullptr;
  ck(cudaMalloc(&pool_mem, pool_bytes), "cudaMalloc");
  ck(cudaMalloc(&ws, hm::cuda::sample_workspace_bytes(B, V)), "cudaMalloc");
  ck(cudaMalloc(&out, size_t(B) * 4), "cudaMalloc");
  const hm::cuda::SamplerPool pool{pool_mem, B, 64};
  const struct { const char* name; float t; int k; float p, min_p; } cases[] = {
      {"greedy", 0.f, 0, 1.f, 0.f}, {"top-k 40 + top-p + min-p", 0.8f, 40, 0.95f, 0.05f}, {"top-p 0.95 alone", 0.8f, 0, 0.95f, 0.f}};
  for (const auto& c : cases) {
    hm::cuda::SampleParams p;
    p.temperature = c.t;
    p.top_k = c.k;
    p.top_p = c.p;
    p.min_p = c.min_p;
    for (int b = 0; b < B; ++b) {
      p.seed = uint64_t(b);
      hm::cuda::sampler_set_slot(pool, b, hm::cuda::make_sampler_slot(p, 64), nullptr);
    }
    const double ms = time_ms([&](int) { hm::cuda::sample(out, logits, V, B, V, V, pool, nullptr, ws, nullptr); }, 15, 20);
    std::printf("sample        f32  B %-3d V %-6d %-26s %8.2f us\n", B, V, c.name, ms * 1e3);
  }
  cudaFree(logits); cudaFree(pool_mem); cudaFree(ws); cudaFree(out);
}

// One decode projection y[m, n] = x[m, k] . W[n, k]^T (bf16 x and W; y bf16, or float for the
// LM head's logits) at m = 1, 16 and 64: the skinny GEMM, cuBLASLt through hm::cuda::Gemm (the
// backend's path for 2-64 rows before the skinny kernel, with its split-K reduce kernel where
// its heuristic picks one) and, at one row, the GEMV (decode.h, the backend's path there). W
// rotates over copies totalling >= 256 MB, so every call streams it from memory as a decode step
// does (a step reads every layer's weights once; they do not stay in the 50-60 MB L2). floor =
// W bytes / the copy rate; "x floor" = that over the measured time (1.00 = at the copy rate).
// A decode projection's operands: bf16 W [n, k] in copies totalling >= 256 MB (call i reads copy
// i % sets), x [64, k], y [64, n] of TY; floor_us = one W's bytes at the copy rate.
template <class TY>
struct Projection {
  using T = __nv_bfloat16;
  std::vector<T*> Ws;
  T* x = nullptr;
  TY* y = nullptr;
  int sets = 0;
  double floor_us = 0;
  Projection(int n, int k, double hbm) {
    const size_t wbytes = size_t(n) * size_t(k) * sizeof(T);
    sets = int(std::clamp<size_t>(((size_t(256) << 20) + wbytes - 1) / wbytes, 2, 256));
    for (int i = 0; i < sets; ++i) Ws.push_back(random_dev<T>(size_t(n) * k, -0.05f, 0.05f, 70 + uint64_t(i)));
    x = random_dev<T>(size_t(64) * k, -1.f, 1.f, 66);
    y = random_dev<TY>(size_t(64) * n, -1.f, 1.f, 67);
    floor_us = double(wbytes) / (hbm * 1e9) * 1e6;
  }
  Projection(const Projection&) = delete;
  Projection& operator=(const Projection&) = delete;
  ~Projection() {
    for (T* w : Ws) cudaFree(w);
    cudaFree(x);
    cudaFree(y);
  }
  const T* W(int i) const { return Ws[size_t(i % sets)]; }
};

template <class TY>
void bench_skinny(const char* name, int n, int k, double hbm, hm::cuda::Gemm& gemm) {
  using T = __nv_bfloat16;
  const size_t wbytes = size_t(n) * size_t(k) * sizeof(T);
  const Projection<TY> pr(n, k, hbm);
  T* x = pr.x;
  TY* y = pr.y;
  const cudaDataType_t ty = sizeof(TY) == 4 ? CUDA_R_32F : CUDA_R_16BF;
  const double floor_us = pr.floor_us;
  const hm::cuda::SkinnyPlan plan = hm::cuda::skinny_plan(n, k, sizeof(T));
  for (int m : {1, 16, 64}) {
    const double us_sk = 1e3 * time_ms([&](int i) {
      hm::cuda::skinny<T, TY>(y, n, x, k, pr.W(i), k, m, n, k, false, nullptr);
    }, 15, 20);
    const double us_lt = 1e3 * time_ms([&](int i) {
      gemm.linear(y, ty, n, x, k, pr.W(i), k, CUDA_R_16BF, m, n, k, false, nullptr);
    }, 15, 20);
    double us_gv = 0;
    if (m == 1 && hm::cuda::gemv_fits(m, k, x, k, pr.W(0), k, nullptr, sizeof(T)))
      us_gv = 1e3 * time_ms([&](int i) {
        hm::cuda::gemv<T, TY>(y, n, x, k, pr.W(i), k, m, n, k, false, nullptr, 0.0f, nullptr, nullptr);
      }, 15, 20);
    std::printf("skinny        %-8s m %-2d n %-5d k %-4d W %6.1f MB  floor %6.2f us | skinny %7.2f us (%4.2fx floor, "
                "bn %3d, %d splits) | cuBLASLt %7.2f us (%4.2fx floor) %5.2fx",
                name, m, n, k, double(wbytes) / 1e6, floor_us, us_sk, floor_us / us_sk, plan.bn, plan.splits, us_lt,
                floor_us / us_lt, us_lt / us_sk);
    if (us_gv > 0) std::printf(" | gemv %7.2f us (%4.2fx floor) %5.2fx", us_gv, floor_us / us_gv, us_gv / us_sk);
    std::printf("\n");
  }
}

// Every tiling of the skinny GEMM (chunk width x rows of W per block x k splits; `plan` overrides
// skinny_plan) for one decode projection at m = 1, 16 and 64, W rotated as in bench_skinny:
// whether longer runs of each W row per stage (wider chunks) or more blocks in flight (smaller
// tiles, more splits) stream W closer to the copy rate than the plan's one wave of the largest
// tiles of 32-wide chunks. "*" marks skinny_plan's choice.
void bench_skinny_plans(const char* name, int n, int k, double hbm) {
  using T = __nv_bfloat16;
  const Projection<T> pr(n, k, hbm);
  const double floor_us = pr.floor_us;
  const hm::cuda::SkinnyPlan chosen = hm::cuda::skinny_plan(n, k, sizeof(T));
  for (int ch : {32, 64, 128})
    for (int bn : {128, 64, 32})
      for (int splits : {1, 2, 4, 8}) {
        if (splits > (k + ch - 1) / ch) continue;
        const hm::cuda::SkinnyPlan p{bn, splits, ch};
        const bool is_chosen = bn == chosen.bn && splits == chosen.splits && ch == chosen.chunk;
        std::printf("skinny-plan   %-8s chunk %3d bn %3d splits %d blocks %5d%s floor %6.2f us |", name, ch, bn,
                    splits, ((n + bn - 1) / bn) * splits, is_chosen ? "*" : " ", floor_us);
        for (int m : {1, 16, 64}) {
          const double us = 1e3 * time_ms([&](int i) {
            hm::cuda::skinny<T, T>(pr.y, n, pr.x, k, pr.W(i), k, m, n, k, false, nullptr, &p);
          }, 15, 20);
          std::printf(" m %-2d %7.2f us (%4.2fx)", m, us, floor_us / us);
        }
        std::printf("\n");
      }
}

// A prefix-cache restore of the seed preset at 1,984 cached tokens (docs/SERVING.md): 186 spans
// of 64 KB (3 attention layers x 31 blocks x K and V rows) and 18 state spans (9 Mamba layers'
// 12 KB conv window and 64 KB SSM state), copied by one cudaMemcpyAsync per span, by one
// cudaMemcpyBatchAsync, and by the copy_spans kernel (Backend::copy_many on CUDA). Host: the
// call's own time (what a server's admission pays); done: until a stream synchronize returns.
void bench_copy_spans() {
  std::vector<hm::cuda::Span> spans;
  std::vector<size_t> sizes(186, 65536);
  for (int l = 0; l < 9; ++l) {
    sizes.push_back(12288);
    sizes.push_back(65536);
  }
  size_t total = 0;
  for (size_t b : sizes) total += b;
  char *src = nullptr, *dst = nullptr;
  ck(cudaMalloc(&src, total), "cudaMalloc");
  ck(cudaMalloc(&dst, total), "cudaMalloc");
  ck(cudaMemset(src, 1, total), "cudaMemset");
  size_t at = 0;
  for (size_t b : sizes) {
    spans.push_back({dst + at, src + at, b});
    at += b;
  }
  std::vector<void*> dv, sv;
  std::vector<size_t> bv;
  for (const auto& s : spans) {
    dv.push_back(s.dst);
    sv.push_back(const_cast<void*>(s.src));
    bv.push_back(s.bytes);
  }
  // A stream of its own: cudaMemcpyBatchAsync refuses the legacy default stream ("invalid
  // argument", seen on the H100 in stop 36).
  cudaStream_t st = nullptr;
  ck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
  using Clock = std::chrono::steady_clock;
  auto run = [&](const char* name, auto issue) {
    std::vector<double> host, done;
    for (int r = 0; r < 25; ++r) {
      ck(cudaDeviceSynchronize(), "sync");
      const auto t0 = Clock::now();
      issue();
      const auto t1 = Clock::now();
      ck(cudaStreamSynchronize(st), "sync");
      const auto t2 = Clock::now();
      if (r < 5) continue;  // warm-up
      host.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      done.push_back(std::chrono::duration<double, std::micro>(t2 - t0).count());
    }
    std::sort(host.begin(), host.end());
    std::sort(done.begin(), done.end());
    std::printf("copy spans    %zu spans, %.1f MB  %-26s host %8.1f us  done %8.1f us\n", spans.size(), double(total) / 1e6,
                name, host[host.size() / 2], done[done.size() / 2]);
  };
  run("cudaMemcpyAsync per span", [&] {
    for (const auto& s : spans) ck(cudaMemcpyAsync(s.dst, s.src, s.bytes, cudaMemcpyDeviceToDevice, st), "copy");
  });
  run("cudaMemcpyBatchAsync", [&] {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t first = 0;
    ck(cudaMemcpyBatchAsync(dv.data(), sv.data(), bv.data(), dv.size(), &attr, &first, 1, st),
       "cudaMemcpyBatchAsync");
  });
  run("copy_spans kernel", [&] { hm::cuda::copy_spans(spans.data(), int(spans.size()), st); });
  cudaStreamDestroy(st);
  cudaFree(src);
  cudaFree(dst);
}

}  // namespace

int main(int argc, char** argv) {
  int dev = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
    std::printf("bench_cuda_kernels: no CUDA device; nothing measured\n");
    return 0;
  }
  const double hbm = copy_gbs();
  std::printf("device %s, %d SMs, L2 %d MB; device-to-device copy %.0f GB/s (read + write)\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, hbm);
  const bool skinny_only = argc > 1 && std::string(argv[1]) == "skinny";
  auto skinny = [&] {
    hm::cuda::Gemm gemm;
    bench_skinny<__nv_bfloat16>("in_proj", 8192, 2048, hbm, gemm);
    bench_skinny<__nv_bfloat16>("x_proj", 160, 4096, hbm, gemm);
    bench_skinny<__nv_bfloat16>("dt_proj", 4096, 128, hbm, gemm);
    bench_skinny<__nv_bfloat16>("out_proj", 2048, 4096, hbm, gemm);
    bench_skinny<float>("lm_head", 50280, 2048, hbm, gemm);
  };
  if (skinny_only) {
    skinny();
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "skinny-plans") {  // every tiling of the skinny GEMM
    bench_skinny_plans("in_proj", 8192, 2048, hbm);
    bench_skinny_plans("out_proj", 2048, 4096, hbm);
    bench_skinny_plans("x_proj", 160, 4096, hbm);
    return 0;
  }
  auto attn_train = [] {
    bench_attention_train<__nv_bfloat16>(8, 2048, 8, 8, 64);   // the seed shape's attention layer
    bench_attention_train<__nv_bfloat16>(8, 2048, 16, 16, 128);
    bench_attention_train<__nv_bfloat16>(8, 2048, 16, 4, 128);  // GQA 4
  };
  if (argc > 1 && std::string(argv[1]) == "attn-train") {  // this part alone
    attn_train();
    return 0;
  }
  auto scan_train = [hbm] {
    bench_scan_train<__nv_bfloat16>(8, 1536, 2048, 16, hbm);
    bench_scan_train<__nv_bfloat16>(8, 2048, 2048, 16, hbm);  // mamba_ssm's fwd + bwd here: 3.1 ms
    bench_scan_train<__half>(8, 1536, 2048, 16, hbm);
    bench_scan_train<float>(8, 1536, 2048, 16, hbm);
  };
  if (argc > 1 && std::string(argv[1]) == "copy-spans") {  // this part alone
    bench_copy_spans();
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "scan-train") {  // this part alone
    scan_train();
    return 0;
  }
  bench_scan<__nv_bfloat16>(8, 2048, 2048, 16, hbm, 0.59);
  bench_scan<__nv_bfloat16>(1, 2048, 2048, 16, hbm, 0);
  bench_scan<__nv_bfloat16>(1, 4096, 2048, 16, hbm, 0);
  bench_scan<float>(8, 2048, 2048, 16, hbm, 1.16);
  scan_train();
  for (int nseq : {1, 16, 64}) bench_step<__nv_bfloat16>(nseq, 4096, 16, 4, hbm);
  for (int nseq : {1, 16, 64}) bench_step<__nv_bfloat16>(nseq, 1536, 16, 4, hbm);
  bench_attention<__nv_bfloat16>(true, 8, 2048, 8, 8, 64, hbm);
  bench_attention<__nv_bfloat16>(true, 1, 2048, 8, 8, 64, hbm);
  bench_attention<__nv_bfloat16>(true, 2, 8192, 16, 4, 128, hbm);
  for (int ctx : {128, 8192})
    for (int nseq : {1, 16, 64}) bench_attention<__nv_bfloat16>(false, nseq, ctx, 8, 8, 64, hbm);
  for (int nseq : {1, 16, 64}) bench_attention<__nv_bfloat16>(false, nseq, 8192, 32, 8, 128, hbm);
  attn_train();
  for (int B : {1, 64}) bench_sampling(B, 50280);
  bench_copy_spans();
  skinny();
  return 0;
}
