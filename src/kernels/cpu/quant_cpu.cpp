// linear_packed and friends (kernels/quant.h): the ISA chosen at run time, the threading, the
// scalar kernels and the GEMM path. This file is compiled for plain x86-64 (CMakeLists.txt):
// it is what runs before anything is known about the CPU.
//
// Decode (m <= 4): a GEMV that reads each packed row once (bf16 / f16 widened to float in registers,
// q8_0 / q4_0 by integer dot products with x rounded to 8 bits); the threads split n into
// contiguous ranges. Prefill (m > 4): panels of W are widened into a per-thread float32 tile
// and multiplied by OpenBLAS sgemm, one panel per task; inside the parallel region sgemm runs
// on the calling thread.
#include <cpuid.h>
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "kernels/cpu/aligned.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/quant_isa.h"
#include "kernels/quant.h"

namespace hm::cpu {
namespace packed {
namespace {

void dequant_block(WeightType t, float* w, const unsigned char* row, int b) {
  if (t == WeightType::Q8_0) {
    BlockQ8_0 blk;
    std::memcpy(&blk, row + size_t(b) * sizeof blk, sizeof blk);
    const float d = f16_to_f32(blk.d);
    for (int j = 0; j < kQuantBlock; ++j) w[j] = d * float(blk.q[j]);
  } else {
    BlockQ4_0 blk;
    std::memcpy(&blk, row + size_t(b) * sizeof blk, sizeof blk);
    const float d = f16_to_f32(blk.d);
    for (int j = 0; j < kQuantBlock / 2; ++j) {
      w[j] = d * float((blk.qs[j] & 15) - 8);
      w[j + 16] = d * float((blk.qs[j] >> 4) - 8);
    }
  }
}

// The weights of elements [32 b, 32 b + n) of a row.
template <WeightType T>
void chunk(float* w, const unsigned char* row, int b, int n) {
  if constexpr (!is_block_format(T)) {
    for (int j = 0; j < n; ++j) {
      uint16_t h;
      std::memcpy(&h, row + (size_t(b) * kQuantBlock + j) * 2, 2);
      w[j] = T == WeightType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  } else {
    dequant_block(T, w, row, b);
  }
}

template <WeightType T>
void gemv_scalar(float* y, int ldy, const float* x, int ldx, const unsigned char* W,
                 size_t row_bytes, int m, int n0, int n1, int k, bool accumulate) {
  for (int o = n0; o < n1; ++o) {
    const unsigned char* row = W + size_t(o) * row_bytes;
    float s[4] = {};
    float w[kQuantBlock];
    for (int b = 0; b * kQuantBlock < k; ++b) {
      const int n = std::min(kQuantBlock, k - b * kQuantBlock);
      chunk<T>(w, row, b, n);
      for (int i = 0; i < m; ++i) {
        const float* xi = x + size_t(i) * ldx + size_t(b) * kQuantBlock;
        for (int j = 0; j < n; ++j) s[i] += w[j] * xi[j];
      }
    }
    for (int i = 0; i < m; ++i) {
      float& out = y[size_t(i) * ldy + o];
      out = accumulate ? out + s[i] : s[i];
    }
  }
}

void quantize_x_scalar(int8_t* q, float* d, int32_t* s, const float* x, int k) {
  for (int b = 0; b < k / kQuantBlock; ++b) {
    const float* v = x + size_t(b) * kQuantBlock;
    float amax = 0;
    bool bad = false;
    for (int j = 0; j < kQuantBlock; ++j) {
      amax = std::max(amax, std::fabs(v[j]));
      bad = bad || !std::isfinite(v[j]);
    }
    const float db = amax / 127.0f;
    const float inv = db != 0 && !bad ? 1.0f / db : 0.0f;
    int32_t sum = 0;
    for (int j = 0; j < kQuantBlock; ++j) {
      q[b * kQuantBlock + j] = bad ? 0 : int8_t(std::nearbyint(v[j] * inv));  // ties to even
      sum += q[b * kQuantBlock + j];
    }
    d[b] = bad ? NAN : db;
    s[b] = sum;
  }
}

template <bool Q4>
void gemv_q_scalar(float* y, int ldy, const int8_t* xq, const float* xd, const int32_t*,
                   const unsigned char* W, size_t row_bytes, int m, int n0, int n1, int k,
                   bool accumulate) {
  const int nb = k / kQuantBlock;
  for (int o = n0; o < n1; ++o) {
    const unsigned char* row = W + size_t(o) * row_bytes;
    float acc[4] = {};
    for (int b = 0; b < nb; ++b) {
      int8_t w[kQuantBlock];
      uint16_t dh;
      if (Q4) {
        BlockQ4_0 blk;
        std::memcpy(&blk, row + size_t(b) * sizeof blk, sizeof blk);
        for (int j = 0; j < kQuantBlock / 2; ++j) {
          w[j] = int8_t((blk.qs[j] & 15) - 8);
          w[j + 16] = int8_t((blk.qs[j] >> 4) - 8);
        }
        dh = blk.d;
      } else {
        BlockQ8_0 blk;
        std::memcpy(&blk, row + size_t(b) * sizeof blk, sizeof blk);
        std::memcpy(w, blk.q, sizeof w);
        dh = blk.d;
      }
      const float dw = f16_to_f32(dh);
      for (int i = 0; i < m; ++i) {
        const int8_t* xi = xq + size_t(i) * k + size_t(b) * kQuantBlock;
        int32_t dot = 0;
        for (int j = 0; j < kQuantBlock; ++j) dot += int32_t(w[j]) * xi[j];
        acc[i] += dw * xd[size_t(i) * nb + b] * float(dot);
      }
    }
    for (int i = 0; i < m; ++i) {
      float& out = y[size_t(i) * ldy + o];
      out = accumulate ? out + acc[i] : acc[i];
    }
  }
}

template <WeightType T>
void dequant_scalar(float* out, const unsigned char* row, int k) {
  for (int b = 0; b * kQuantBlock < k; ++b)
    chunk<T>(out + size_t(b) * kQuantBlock, row, b, std::min(kQuantBlock, k - b * kQuantBlock));
}

}  // namespace

Table scalar_table() {
  return {{gemv_scalar<WeightType::BF16>, gemv_scalar<WeightType::F16>},
          {gemv_q_scalar<false>, gemv_q_scalar<true>},
          quantize_x_scalar,
          {dequant_scalar<WeightType::BF16>, dequant_scalar<WeightType::Q8_0>, dequant_scalar<WeightType::Q4_0>,
           dequant_scalar<WeightType::F16>},
          {nullptr, nullptr}};
}

}  // namespace packed

// ---- ISA choice ---------------------------------------------------------------------------------

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "?";
}

namespace {
// F16C from CPUID (leaf 1, ECX bit 29): clang 14's __builtin_cpu_supports has no "f16c".
bool cpu_has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
}  // namespace

bool isa_supported(Isa isa) {
  __builtin_cpu_init();  // libgcc's CPU model, also checks that the OS saves the vector state
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2:
      // x86-64-v3, which the avx2 kernels are compiled for (BMI1/2 come with it)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c() &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    case Isa::Avx512:
      return isa_supported(Isa::Avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd") &&
             __builtin_cpu_supports("avx512vnni");
  }
  return false;
}

Isa best_isa() {
  for (Isa isa : {Isa::Avx512, Isa::Avx2})
    if (isa_supported(isa)) return isa;
  return Isa::Scalar;
}

namespace {

packed::Table table_of(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return packed::avx512_table();
    case Isa::Avx2: return packed::avx2_table();
    case Isa::Scalar: break;
  }
  return packed::scalar_table();
}

std::atomic<int> g_isa{-1};  // -1: not chosen yet

}  // namespace

Isa quant_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = int(default_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return Isa(v);
}

void set_quant_isa(Isa isa) {
  HM_CHECK(isa_supported(isa), "set_quant_isa: this CPU does not support ", isa_name(isa));
  g_isa.store(int(isa), std::memory_order_relaxed);
}

// ---- kernels ------------------------------------------------------------------------------------

namespace {

void check_sizes(const char* op, WeightType t, int n, int k) {
  HM_CHECK(n > 0, op, ": n = ", n, " must be positive");
  row_bytes(t, k);  // validates k for the type
}

// Below this many weight bytes a GEMV runs on one thread: waking the team costs more.
constexpr size_t kParallelBytes = size_t(128) << 10;
// Floats in one thread's GEMM tile (4 MiB). sgemm re-reads all of x [m, k] for each panel, so
// panels must be tall: with 1 MiB tiles (64 rows at k = 4096) prefill at m = 512 ran at 0.55 of
// f32 (bench/bench_quant.cpp); the tile is read once, from L2 or L3.
constexpr int kTileFloats = 1 << 20;

// Per-thread scratch, grown and kept (a fresh allocation per call would page-fault each time).
std::vector<float>& tile_buffer() {
  thread_local std::vector<float> buf;
  return buf;
}
struct RoundedX {
  std::vector<int8_t> q;
  std::vector<float> d, deq;
  std::vector<int32_t> s;
};
RoundedX& rounded_x_buffer() {
  thread_local RoundedX buf;
  return buf;
}

// x [m, k] (row stride ldx) rounded to 8 bits per block (kernels/quant.h), rows packed; the
// rows spread over the threads when there are many (prefill).
RoundedX& round_x(const packed::Table& tab, const float* x, int ldx, int m, int k) {
  RoundedX& r = rounded_x_buffer();
  const size_t nb = size_t(k / kQuantBlock);
  r.q.resize(size_t(m) * k);
  r.d.resize(size_t(m) * nb);
  r.s.resize(size_t(m) * nb);
#pragma omp parallel for schedule(static) if (size_t(m) * k >= (size_t(64) << 10))
  for (int i = 0; i < m; ++i)
    tab.quantize_x(r.q.data() + size_t(i) * k, r.d.data() + i * nb, r.s.data() + i * nb,
                   x + size_t(i) * ldx, k);
  return r;
}

// Prefill of q8_0 / q4_0 on an ISA with an integer GEMM: tasks of panels of W by ranges of x
// rows, each thread repacking its panel into its own scratch.
void gemm_int(const packed::Table& tab, float* y, int ldy, const float* x, int ldx, const unsigned char* W,
              WeightType t, int m, int n, int k, bool accumulate) {
  const RoundedX& r = round_x(tab, x, ldx, m, k);
  const packed::GemmQFn gemm = tab.gemm_q[t == WeightType::Q4_0];
  const size_t rb = row_bytes(t, k), nb = size_t(k / kQuantBlock);
  const int threads = omp_get_max_threads();
  // Panels of kGemmPanel rows in groups (enough tasks to balance the threads); x rows split
  // only when there are too few panels (x_proj: 64 rows).
  const int panels = (n + packed::kGemmPanel - 1) / packed::kGemmPanel;
  const int groups = std::min(panels, 4 * threads);
  const int mchunks = std::clamp(4 * threads / groups, 1, (m + 47) / 48);
  const int mrows = (m + mchunks - 1) / mchunks;
  const int tasks = groups * mchunks;
#pragma omp parallel for schedule(dynamic, 1) if (tasks > 1 && threads > 1)
  for (int task = 0; task < tasks; ++task) {
    const int g = task / mchunks, c = task % mchunks;
    const int o0 = int(long(panels) * g / groups) * packed::kGemmPanel;
    const int o1 = std::min(n, int(long(panels) * (g + 1) / groups) * packed::kGemmPanel);
    const int i0 = c * mrows, i1 = std::min(m, i0 + mrows);
    if (o0 >= o1 || i0 >= i1) continue;
    thread_local AlignedVec<unsigned char> scratch;
    if (scratch.size() < nb * packed::kGemmScratchPerBlock) scratch.resize(nb * packed::kGemmScratchPerBlock);
    gemm(y + size_t(i0) * ldy, ldy, r.q.data() + size_t(i0) * k, r.d.data() + i0 * nb, r.s.data() + i0 * nb,
         W, rb, i1 - i0, o0, o1, k, accumulate, scratch.data());
  }
}

void gemm_panels(const packed::Table& tab, float* y, int ldy, const float* x, int ldx,
                 const unsigned char* W, WeightType t, int m, int n, int k, bool accumulate) {
  if (is_block_format(t)) {  // the rounded x, as floats: the GEMV's math, by sgemm
    RoundedX& r = round_x(tab, x, ldx, m, k);
    r.deq.resize(size_t(m) * k);
    for (size_t i = 0; i < r.q.size(); ++i) r.deq[i] = r.d[i / kQuantBlock] * float(r.q[i]);
    x = r.deq.data();
    ldx = k;
  }
  const size_t rb = row_bytes(t, k);
  const int threads = omp_get_max_threads();
  // Panel height: a tile of about kTileFloats, in multiples of 16 rows, with the panel count a
  // multiple of the thread count so that no thread idles at the end.
  const int rows_max = std::clamp(kTileFloats / k / 16 * 16, 16, 1024);
  int panels = (n + rows_max - 1) / rows_max;
  panels = (panels + threads - 1) / threads * threads;
  const int rows = std::max(1, ((n + panels - 1) / panels + 15) / 16 * 16);
  panels = (n + rows - 1) / rows;
  const float beta = accumulate ? 1.0f : 0.0f;
  const bool in_blocks = linear_large_in_blocks();
#pragma omp parallel for schedule(dynamic, 1) if (panels > 1)
  for (int p = 0; p < panels; ++p) {
    const int o0 = p * rows, h = std::min(rows, n - o0);
    std::vector<float>& tile = tile_buffer();
    if (tile.size() < size_t(h) * k) tile.resize(size_t(h) * k);
    for (int r = 0; r < h; ++r) tab.dequant[int(t)](tile.data() + size_t(r) * k, W + size_t(o0 + r) * rb, k);
    if (in_blocks) {  // as linear() for float W (dispatch.h, LinearLarge)
      linear_in_blocks(y + o0, ldy, x, ldx, tile.data(), m, h, k, accumulate);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, h, k, 1.0f, x, ldx, tile.data(), k, beta,
                  y + o0, ldy);
    }
  }
}

}  // namespace

void quantize(WeightType t, void* dst, const float* src, int n, int k) {
  check_sizes("quantize", t, n, k);
  // Offline work: the reference's rows, spread over the threads (errors are rethrown here).
  const size_t rb = row_bytes(t, k);
  const int chunks = std::min(n, 4 * omp_get_max_threads());
  std::vector<std::string> errors(static_cast<size_t>(chunks));
#pragma omp parallel for schedule(dynamic, 1)
  for (int c = 0; c < chunks; ++c) {
    const int r0 = int(long(n) * c / chunks), r1 = int(long(n) * (c + 1) / chunks);
    try {
      ref::quantize(t, static_cast<unsigned char*>(dst) + size_t(r0) * rb, src + size_t(r0) * k, r1 - r0, k);
    } catch (const Error& e) {
      errors[size_t(c)] = std::string(e.what()) + " (rows counted from " + std::to_string(r0) + ")";
    }
  }
  for (const std::string& e : errors) HM_CHECK(e.empty(), e);
}

void dequantize(WeightType t, float* dst, const void* src, int n, int k) {
  check_sizes("dequantize", t, n, k);
  const packed::Table tab = table_of(quant_isa());
  const size_t rb = row_bytes(t, k);
  const auto* W = static_cast<const unsigned char*>(src);
#pragma omp parallel for schedule(static) if (size_t(n) * rb >= kParallelBytes)
  for (int r = 0; r < n; ++r) tab.dequant[int(t)](dst + size_t(r) * k, W + size_t(r) * rb, k);
}

void linear_packed(float* y, int ldy, const float* x, int ldx, const void* W, WeightType t, int m,
                   int n, int k, bool accumulate) {
  check_sizes("linear_packed", t, n, k);
  HM_CHECK(m >= 0, "linear_packed: m = ", m, " must not be negative");
  if (m == 0) return;
  const packed::Table tab = table_of(quant_isa());
  const auto* Wb = static_cast<const unsigned char*>(W);
  if (m > 4) {
    if (is_block_format(t) && tab.gemm_q[t == WeightType::Q4_0])
      gemm_int(tab, y, ldy, x, ldx, Wb, t, m, n, k, accumulate);
    else
      gemm_panels(tab, y, ldy, x, ldx, Wb, t, m, n, k, accumulate);
    return;
  }
  const size_t rb = row_bytes(t, k);
  const bool parallel = size_t(n) * rb >= kParallelBytes && omp_get_max_threads() > 1;
  // Each thread takes a contiguous range of output rows.
  auto run = [&](auto&& gemv_range) {
    if (!parallel) {
      gemv_range(0, n);
      return;
    }
#pragma omp parallel
    {
      const int id = omp_get_thread_num(), nt = omp_get_num_threads();
      gemv_range(int(long(n) * id / nt), int(long(n) * (id + 1) / nt));
    }
  };
  if (!is_block_format(t)) {
    const packed::GemvFn gemv = tab.gemv_half[t == WeightType::F16];
    run([&](int n0, int n1) { gemv(y, ldy, x, ldx, Wb, rb, m, n0, n1, k, accumulate); });
  } else {
    const RoundedX& r = round_x(tab, x, ldx, m, k);
    const packed::GemvQFn gemv = tab.gemv_q[t == WeightType::Q4_0];
    run([&](int n0, int n1) {
      gemv(y, ldy, r.q.data(), r.d.data(), r.s.data(), Wb, rb, m, n0, n1, k, accumulate);
    });
  }
}

}  // namespace hm::cpu
