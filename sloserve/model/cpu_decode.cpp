// Decode steps of 4-bit models on the CPU: every layer of a few-row, decode-only step in one
// call (cpu_decode.py says why and when). The four matmuls a layer are q4_linear below;
// the small ops between them (residual add, RMSNorm, rotary, the KV write, attention over the
// paged cache, SiLU-and-mul) are plain loops here, where eager torch spends more time
// dispatching them than computing. Activations stay float32 throughout (the Python path
// rounds them to bfloat16 around each int4 matmul).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

struct Shape {
  int64_t rows, hidden, heads, kv_heads, dim, inter;
};

// x += residual (when given), residual = x, out = rms_norm(x) * w
void add_rms_norm(float* x, const float* residual, float* residual_out, const float* w,
                  float* out, const Shape& s, double eps) {
  for (int64_t r = 0; r < s.rows; ++r) {
    float* xr = x + r * s.hidden;
    float sum = 0.f;
    for (int64_t i = 0; i < s.hidden; ++i) {
      float v = residual ? xr[i] + residual[r * s.hidden + i] : xr[i];
      residual_out[r * s.hidden + i] = v;
      sum += v * v;
    }
    const float inv = 1.f / std::sqrt(sum / s.hidden + static_cast<float>(eps));
    for (int64_t i = 0; i < s.hidden; ++i)
      out[r * s.hidden + i] = residual_out[r * s.hidden + i] * inv * w[i];
  }
}

// HF's rotary on one head: pairs (i, i + dim/2)
inline void rotate(const float* in, float* out, const float* cos, const float* sin,
                   int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = in[i], x2 = in[i + half];
    out[i] = x1 * cos[i] - x2 * sin[i];
    out[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

// q rotated into `q`; k rotated and v written into the layer's cache at each row's slot
void rope_and_write_kv(const float* qkv, float* q, float* cache, int64_t cache_half,
                       const int64_t* positions, const int32_t* slots, const float* cos,
                       const float* sin, const Shape& s) {
  const int64_t half = s.dim / 2, width = (s.heads + 2 * s.kv_heads) * s.dim;
  for (int64_t r = 0; r < s.rows; ++r) {
    const float* row = qkv + r * width;
    const float* c = cos + positions[r] * half;
    const float* sn = sin + positions[r] * half;
    for (int64_t h = 0; h < s.heads; ++h)
      rotate(row + h * s.dim, q + (r * s.heads + h) * s.dim, c, sn, s.dim);
    float* k_out = cache + static_cast<int64_t>(slots[r]) * s.kv_heads * s.dim;
    float* v_out = k_out + cache_half;
    for (int64_t g = 0; g < s.kv_heads; ++g) {
      rotate(row + (s.heads + g) * s.dim, k_out + g * s.dim, c, sn, s.dim);
      const float* v = row + (s.heads + s.kv_heads + g) * s.dim;
      for (int64_t i = 0; i < s.dim; ++i) v_out[g * s.dim + i] = v[i];
    }
  }
}

// One query row per sequence against its paged K/V.
void attend(const float* q, const float* cache, int64_t cache_half, const int32_t* tables,
            int64_t table_width, const int32_t* seq_lens, int64_t block_size, double scale,
            float* out, const Shape& s) {
  const int64_t group = s.heads / s.kv_heads;
  at::parallel_for(0, s.rows * s.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(s.dim);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / s.heads, h = job % s.heads, g = h / group;
      const float* qh = q + (r * s.heads + h) * s.dim;
      const int32_t* table = tables + r * table_width;
      const int64_t len = seq_lens[r];
      scores.resize(len);
      float best = -INFINITY;
      for (int64_t p = 0; p < len; ++p) {
        const int64_t slot = static_cast<int64_t>(table[p / block_size]) * block_size +
                             p % block_size;
        const float* k = cache + (slot * s.kv_heads + g) * s.dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < s.dim; ++i) dot += qh[i] * k[i];
        scores[p] = dot * static_cast<float>(scale);
        best = std::max(best, scores[p]);
      }
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < len; ++p) {
        const float e = std::exp(scores[p] - best);
        total += e;
        const int64_t slot = static_cast<int64_t>(table[p / block_size]) * block_size +
                             p % block_size;
        const float* v = cache + cache_half + (slot * s.kv_heads + g) * s.dim;
#pragma omp simd
        for (int64_t i = 0; i < s.dim; ++i) acc[i] += e * v[i];
      }
      float* o = out + (r * s.heads + h) * s.dim;
      for (int64_t i = 0; i < s.dim; ++i) o[i] = acc[i] / total;
    }
  });
}

// ---- 4-bit matmul for a few rows --------------------------------------------------------
// torch's int4 CPU kernel reads ~3.5 GB/s on AVX2-only CPUs (no AVX-512 path): 15 ms a
// token for SmolLM2's layers. Weights here: for row n and group g of 32 inputs, 16 bytes
// whose byte j holds code j (low nibble) and code j + 16 (high nibble); w = code * scale +
// min (quant.py's grid, scale and min in float16: 20 bytes a group, as GGUF's Q4_1; decode
// here is bound by memory bandwidth). Activations are rounded to 16 bits per group of 32 (one
// scale each) so that a group's 32 products are two integer multiply-adds. (llama.cpp rounds
// them to 8 bits: with SmolLM2's large activations that lost a fifth of greedy agreement with
// float32 against torch's bfloat16 path; benchmarks/quant_agreement.py.)
// multiply-add; the min term uses the exact float sums.
constexpr int64_t kGroup = 32;

inline float f32(at::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

struct Int16Rows {  // activations [M, K] as int16 groups with a scale each, and exact group sums
  std::vector<int16_t> values;
  std::vector<float> scales, sums;
};

struct Int16View {  // rows [r, r + M) of a Int16Rows
  const int16_t* values;
  const float* scales;
  const float* sums;
};

Int16Rows quantize_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t groups = k / kGroup;
  Int16Rows q{std::vector<int16_t>(rows * k), std::vector<float>(rows * groups),
           std::vector<float>(rows * groups)};
  for (int64_t g = 0; g < rows * groups; ++g) {
    const float* xg = x + g * kGroup;
    float peak = 0.f, sum = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) peak = std::max(peak, std::abs(xg[i])), sum += xg[i];
    const float scale = peak / 32767.f, inv = peak > 0.f ? 32767.f / peak : 0.f;
    for (int64_t i = 0; i < kGroup; ++i)
      q.values[g * kGroup + i] = static_cast<int16_t>(std::nearbyint(xg[i] * inv));
    q.scales[g] = scale;
    q.sums[g] = sum;
  }
  return q;
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Groups go eight at a time: their eight scale products and minimum terms in one vector
// each (float16 -> float32 in one instruction), so that a group costs ~11 instructions.
template <int M>
void q4_rows(const Int16View& x, const uint8_t* codes, const at::Half* scales,
             const at::Half* mins, float* out, int64_t k, int64_t n, int64_t begin,
             int64_t end) {
  const int64_t groups = k / kGroup;
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t row = begin; row < end; ++row) {
    // two accumulators a row, even and odd groups: one would wait on the FMA's latency
    __m256 acc[M][2], bias[M];
    for (int m = 0; m < M; ++m)
      acc[m][0] = acc[m][1] = bias[m] = _mm256_setzero_ps();
    const uint8_t* c = codes + row * groups * 16;
    const at::Half* sc = scales + row * groups;
    const at::Half* mn = mins + row * groups;
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
      const int len = static_cast<int>(std::min<int64_t>(8, groups - g0));
      alignas(32) float scale[M][8];
      for (int m = 0; m < M; ++m) {
        const float* xs = x.scales + m * groups + g0;
        const float* sums = x.sums + m * groups + g0;
        if (len == 8) {
          const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g0)));
          const __m256 m8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g0)));
          _mm256_store_ps(scale[m], _mm256_mul_ps(s8, _mm256_loadu_ps(xs)));
          bias[m] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(sums), bias[m]);
        } else {
          alignas(32) float tail[8] = {};
          for (int j = 0; j < len; ++j)
            scale[m][j] = f32(sc[g0 + j]) * xs[j], tail[j] = f32(mn[g0 + j]) * sums[j];
          bias[m] = _mm256_add_ps(bias[m], _mm256_load_ps(tail));
        }
      }
      for (int j = 0; j < len; ++j) {
        const int64_t g = g0 + j;
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + g * 16));
        const __m256i q_lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, mask));  // codes 0-15
        const __m256i q_hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
        for (int m = 0; m < M; ++m) {
          const int16_t* v = x.values + (m * groups + g) * kGroup;
          const __m256i dot = _mm256_add_epi32(
              _mm256_madd_epi16(q_lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))),
              _mm256_madd_epi16(q_hi,
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16))));
          acc[m][j & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                          _mm256_set1_ps(scale[m][j]), acc[m][j & 1]);
        }
      }
    }
    for (int m = 0; m < M; ++m)
      out[m * n + row] = hsum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), bias[m]));
  }
}
// Exact variant (tests): float activations, 4-bit codes unpacked to floats.
template <int M>
void q4_rows_exact(const float* x, const float* xsum, const uint8_t* codes,
                   const at::Half* scales, const at::Half* mins, float* out, int64_t k, int64_t n,
                   int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t row = begin; row < end; ++row) {
    __m256 acc[M];
    float bias[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), bias[m] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const __m128i b = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(codes + (row * groups + g) * 16));
      const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      const __m256 q[4] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                           _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                           _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                           _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))};
      const __m256 scale = _mm256_set1_ps(f32(scales[row * groups + g]));
      for (int m = 0; m < M; ++m) {
        const float* xg = x + m * k + g * kGroup;
        __m256 t = _mm256_mul_ps(q[0], _mm256_loadu_ps(xg));
        for (int j = 1; j < 4; ++j) t = _mm256_fmadd_ps(q[j], _mm256_loadu_ps(xg + 8 * j), t);
        acc[m] = _mm256_fmadd_ps(t, scale, acc[m]);
        bias[m] += f32(mins[row * groups + g]) * xsum[m * groups + g];
      }
    }
    for (int m = 0; m < M; ++m) out[m * n + row] = hsum(acc[m]) + bias[m];
  }
}
#else
template <int M>
void q4_rows(const Int16View& x, const uint8_t* codes, const at::Half* scales, const at::Half* mins,
             float* out, int64_t k, int64_t n, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  for (int64_t row = begin; row < end; ++row)
    for (int m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* c = codes + (row * groups + g) * 16;
        const int16_t* v = x.values + (m * groups + g) * kGroup;
        int32_t dot = 0;
        for (int j = 0; j < 16; ++j) dot += (c[j] & 0x0F) * v[j] + (c[j] >> 4) * v[j + 16];
        total += dot * f32(scales[row * groups + g]) * x.scales[m * groups + g] +
                 f32(mins[row * groups + g]) * x.sums[m * groups + g];
      }
      out[m * n + row] = total;
    }
}
template <int M>
void q4_rows_exact(const float* x, const float* xsum, const uint8_t* codes,
                   const at::Half* scales, const at::Half* mins, float* out, int64_t k, int64_t n,
                   int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  for (int64_t row = begin; row < end; ++row)
    for (int m = 0; m < M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* c = codes + (row * groups + g) * 16;
        const float* xg = x + m * k + g * kGroup;
        float dot = 0.f;
        for (int j = 0; j < 16; ++j) dot += (c[j] & 0x0F) * xg[j] + (c[j] >> 4) * xg[j + 16];
        total += dot * f32(scales[row * groups + g]) +
                 f32(mins[row * groups + g]) * xsum[m * groups + g];
      }
      out[m * n + row] = total;
    }
}
#endif

bool exact_activations = false;  // set_exact_activations: tests hold the fused path to this

template <int M>
void q4_tile(const float* x, const Int16View& q, const uint8_t* codes, const at::Half* scales,
             const at::Half* mins, float* out, int64_t k, int64_t n, int64_t begin,
             int64_t end) {
  if (exact_activations)
    q4_rows_exact<M>(x, q.sums, codes, scales, mins, out, k, n, begin, end);
  else
    q4_rows<M>(q, codes, scales, mins, out, k, n, begin, end);
}

// x [M, K] float32 times the 4-bit weight [N, K]: [M, N] float32. Output rows go in tiles of
// 32, and each tile meets every block of four input rows while its codes (~12 KB) are in
// cache: the weight streams from memory once, whatever M.
at::Tensor q4_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                     const at::Tensor& mins) {
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), k = x.size(1), n = codes.size(0), groups = k / kGroup;
  TORCH_CHECK(k % kGroup == 0 && codes.size(1) * 2 == k, "q4_linear: shapes do not match");
  at::Tensor out = at::empty({rows, n}, x.options());
  const float* xf = x.data_ptr<float>();
  const Int16Rows q = quantize_rows(xf, rows, k);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* sc = scales.data_ptr<at::Half>();
  const at::Half* mn = mins.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  // a second thread costs ~20 us to wake: worth it only for ~32k groups of work and more
  const int64_t blocks = (rows + 3) / 4;
  const int64_t grain = std::max<int64_t>(32, 32768 / (groups * blocks));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t += 32) {
      const int64_t te = std::min(end, t + 32);
      for (int64_t r = 0; r < rows; r += 4) {
        const Int16View v{q.values.data() + r * k, q.scales.data() + r * groups,
                       q.sums.data() + r * groups};
        const float* xr = xf + r * k;
        float* orow = o + r * n;
        switch (std::min<int64_t>(4, rows - r)) {
          case 1: q4_tile<1>(xr, v, c, sc, mn, orow, k, n, t, te); break;
          case 2: q4_tile<2>(xr, v, c, sc, mn, orow, k, n, t, te); break;
          case 3: q4_tile<3>(xr, v, c, sc, mn, orow, k, n, t, te); break;
          default: q4_tile<4>(xr, v, c, sc, mn, orow, k, n, t, te); break;
        }
      }
    }
  });
  return out;
}

// Attention of decode rows (one query each) over their paged K/V: [rows, heads, dim].
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            double scale) {
  const at::Tensor q = q_in.contiguous(), tables = block_tables.contiguous();
  const Shape s{q.size(0), 0, q.size(1), cache.size(3), cache.size(4), 0};
  at::Tensor out = at::empty({s.rows, s.heads * s.dim}, q.options());
  attend(q.data_ptr<float>(), cache.data_ptr<float>(), cache.stride(0),
         tables.data_ptr<int32_t>(), tables.size(1), seq_lens.contiguous().data_ptr<int32_t>(),
         cache.size(2), scale, out.data_ptr<float>(), s);
  return out.view({s.rows, s.heads, s.dim});
}

bool set_exact_activations(bool exact) {
  const bool before = exact_activations;
  exact_activations = exact;
  return before;
}

// weights: per layer [input norm, qkv codes, scales, mins, o codes, scales, mins,
// post-attention norm, gate_up codes, scales, mins, down codes, scales, mins]
constexpr size_t kPerLayer = 14;

std::vector<at::Tensor> decode_layers(
    at::Tensor x, at::Tensor positions, at::TensorList caches, at::Tensor slots,
    at::Tensor block_tables, at::Tensor seq_lens, at::Tensor cos, at::Tensor sin,
    at::TensorList weights, int64_t heads, int64_t kv_heads, int64_t inter, double eps,
    double scale) {
  TORCH_CHECK(weights.size() == caches.size() * kPerLayer, "decode_layers: weights");
  const int64_t rows = x.size(0), hidden = x.size(1);
  const int64_t dim = caches[0].size(4), block_size = caches[0].size(2);
  const Shape s{rows, hidden, heads, kv_heads, dim, inter};
  auto f32 = x.options();
  at::Tensor h = x.contiguous().clone(), residual = at::empty({rows, hidden}, f32);
  at::Tensor normed = at::empty({rows, hidden}, f32), q = at::empty({rows, heads, dim}, f32);
  at::Tensor attn = at::empty({rows, heads * dim}, f32), act = at::empty({rows, inter}, f32);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int32_t* slot = slots.data_ptr<int32_t>();
  const int32_t* table = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const float* c = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  for (size_t layer = 0; layer < caches.size(); ++layer) {
    const at::Tensor* w = &weights[layer * kPerLayer];
    float* cache = caches[layer].data_ptr<float>();
    const int64_t cache_half = caches[layer].stride(0);
    add_rms_norm(h.data_ptr<float>(), layer ? residual.data_ptr<float>() : nullptr,
                 residual.data_ptr<float>(), w[0].data_ptr<float>(), normed.data_ptr<float>(),
                 s, eps);
    at::Tensor qkv = q4_linear(normed, w[1], w[2], w[3]);
    rope_and_write_kv(qkv.data_ptr<float>(), q.data_ptr<float>(), cache, cache_half, pos,
                      slot, c, sn, s);
    attend(q.data_ptr<float>(), cache, cache_half, table, block_tables.size(1), lens,
           block_size, scale, attn.data_ptr<float>(), s);
    at::Tensor o = q4_linear(attn, w[4], w[5], w[6]);
    add_rms_norm(o.data_ptr<float>(), residual.data_ptr<float>(), residual.data_ptr<float>(),
                 w[7].data_ptr<float>(), normed.data_ptr<float>(), s, eps);
    at::Tensor gate_up = q4_linear(normed, w[8], w[9], w[10]);
    const float* gu = gate_up.data_ptr<float>();
    float* a = act.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < inter; ++i) {
        const float g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
        a[r * inter + i] = g / (1.f + std::exp(-g)) * u;
      }
    h = q4_linear(act, w[11], w[12], w[13]);
  }
  return {h, residual};
}

}  // namespace

TORCH_LIBRARY(sloserve_cpu, m) {
  m.def("decode_layers(Tensor x, Tensor positions, Tensor[] caches, Tensor slots, "
        "Tensor block_tables, Tensor seq_lens, Tensor cos, Tensor sin, Tensor[] weights, "
        "int heads, int kv_heads, int inter, float eps, float scale) -> Tensor[]");
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scales, Tensor mins) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor cache, Tensor block_tables, Tensor seq_lens, "
        "float scale) -> Tensor");
  m.impl("decode_layers", c10::DispatchKey::CPU, TORCH_FN(decode_layers));
  m.impl("q4_linear", c10::DispatchKey::CPU, TORCH_FN(q4_linear));
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
  m.def("set_exact_activations(bool exact) -> bool", &set_exact_activations);
}
