// One decode step's attention on a CPU with AVX-512, reading only the columns a row attends: built and chosen by
// cpu_attention.py (which says why it exists); measured against PyTorch's flash kernel by
// scripts/decode_attention/bench.py.
//
// q [n, h, r, d] contiguous: each row's query heads, those of one KV head together (GQA: r per KV head);
// k, v [n, h, W, d] with the last dim contiguous (a slab's window); valid [n, W] bool, last dim contiguous.
// Returns out [n, h, r, d] and the log-sum-exp [n, h, r]. One task per (row, KV head): scores in blocks of 16
// keys (16 partial sums reduced into one vector by hsum16, no horizontal sum per key; the 16 columns' valid bytes
// as a lane mask), softmax with ATen's Vectorized exp, then the values of the valid columns, r (1-8) a
// compile-time constant so that the r x 4 output accumulators stay in registers (with r known only at run time:
// 1.1-1.25x the flash kernel, with it 1.2-1.6x). Requires head_dim 64.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <cmath>
#include <immintrin.h>
#include <limits>
#include <vector>
using Vec = at::vec::Vectorized<float>;

// v[j] -> one vector whose lane j is the sum of v[j]'s 16 lanes
static inline __m512 hsum16(const __m512* v) {
  __m512 r[4];
  for (int g = 0; g < 4; ++g) {
    const __m512* x = v + 4 * g;
    __m512 p = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    __m512 q = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    r[g] = _mm512_add_ps(_mm512_shuffle_ps(p, q, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(p, q, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

template <int64_t R>
static std::vector<at::Tensor> attend(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor valid, double scale) {
  TORCH_CHECK(q.is_contiguous() && k.stride(3) == 1 && v.stride(3) == 1 && valid.stride(1) == 1);
  constexpr int64_t NV = 4;
  const int64_t n = q.size(0), h = q.size(1), d = q.size(3), W = k.size(2);
  TORCH_CHECK(d == NV * Vec::size(), "head_dim 64");
  auto out = at::empty({n, h, R, d}, q.options());
  auto lse = at::empty({n, h, R}, q.options());
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); const float* vp = v.data_ptr<float>();
  const bool* mp = valid.data_ptr<bool>(); float* op = out.data_ptr<float>(); float* lp = lse.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2), ms0 = valid.stride(0);
  const float sc = static_cast<float>(scale);
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(R * W + Vec::size());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / h, j = t % h;
      const float* K = kp + i * ks0 + j * ks1; const float* V = vp + i * vs0 + j * vs1; const bool* M = mp + i * ms0;
      const float* Q = qp + t * R * d;
      Vec qv[R][NV];
      for (int64_t a = 0; a < R; ++a) for (int64_t c = 0; c < NV; ++c) qv[a][c] = Vec::loadu(Q + a * d + c * Vec::size()) * Vec(sc);
      __m512 mxv[R];  // running maximum score per query head, lane by lane
      for (int64_t a = 0; a < R; ++a) mxv[a] = _mm512_set1_ps(ninf);
      const __m512 ninfv = _mm512_set1_ps(ninf);
      int64_t w = 0;
      for (; w + 16 <= W; w += 16) {
        // the 16 columns' valid bytes (0 or 1) as a lane mask
        const __mmask16 live = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(M + w)),
                                                  _mm_set1_epi8(1));
        if (!live) { for (int64_t a = 0; a < R; ++a) _mm512_storeu_ps(s.data() + a * W + w, ninfv); continue; }
        for (int64_t a = 0; a < R; ++a) {
          __m512 acc[16];
          for (int jj = 0; jj < 16; ++jj) {
            const float* kw = K + (w + jj) * ks2;
            Vec x = qv[a][0] * Vec::loadu(kw);
            for (int64_t c = 1; c < NV; ++c) x = at::vec::fmadd(qv[a][c], Vec::loadu(kw + c * Vec::size()), x);
            acc[jj] = x;
          }
          const __m512 x = _mm512_mask_blend_ps(live, ninfv, hsum16(acc));  // padding columns: -inf
          _mm512_storeu_ps(s.data() + a * W + w, x);
          mxv[a] = _mm512_max_ps(mxv[a], x);
        }
      }
      float mx[R];
      for (int64_t a = 0; a < R; ++a) mx[a] = _mm512_reduce_max_ps(mxv[a]);
      for (; w < W; ++w) {
        if (!M[w]) { for (int64_t a = 0; a < R; ++a) s[a * W + w] = ninf; continue; }
        const float* kw = K + w * ks2;
        for (int64_t a = 0; a < R; ++a) {
          Vec acc = qv[a][0] * Vec::loadu(kw);
          for (int64_t c = 1; c < NV; ++c) acc = at::vec::fmadd(qv[a][c], Vec::loadu(kw + c * Vec::size()), acc);
          const float x = _mm512_reduce_add_ps(acc);
          s[a * W + w] = x;
          mx[a] = x > mx[a] ? x : mx[a];
        }
      }
      float sum[R];
      for (int64_t a = 0; a < R; ++a) {
        float* sa = s.data() + a * W;
        const Vec m(mx[a]);
        Vec tot(0.f);
        int64_t w = 0;
        for (; w + Vec::size() <= W; w += Vec::size()) {
          Vec e = (Vec::loadu(sa + w) - m).exp_u20();
          e.store(sa + w); tot = tot + e;
        }
        float rest = 0.f;
        for (; w < W; ++w) { sa[w] = std::exp(sa[w] - mx[a]); rest += sa[w]; }
        sum[a] = _mm512_reduce_add_ps(tot) + rest;
      }
      Vec o[R][NV];
      for (int64_t a = 0; a < R; ++a) for (int64_t c = 0; c < NV; ++c) o[a][c] = Vec(0.f);
      for (int64_t w = 0; w < W; ++w) {
        if (!M[w]) continue;
        const float* vw = V + w * vs2;
        Vec vv[4];
        for (int64_t c = 0; c < NV; ++c) vv[c] = Vec::loadu(vw + c * Vec::size());
        for (int64_t a = 0; a < R; ++a) {
          const Vec p(s[a * W + w]);
          for (int64_t c = 0; c < NV; ++c) o[a][c] = at::vec::fmadd(p, vv[c], o[a][c]);
        }
      }
      for (int64_t a = 0; a < R; ++a) {
        const Vec inv(1.f / sum[a]);
        for (int64_t c = 0; c < NV; ++c) (o[a][c] * inv).store(op + (t * R + a) * d + c * Vec::size());
        lp[t * R + a] = mx[a] + std::log(sum[a]);
      }
    }
  });
  return {out, lse};
}
std::vector<at::Tensor> decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor valid, double scale) {
  switch (q.size(2)) {  // query heads per KV head (GQA): a compile-time count keeps the accumulators in registers
    case 1: return attend<1>(q, k, v, valid, scale);
    case 2: return attend<2>(q, k, v, valid, scale);
    case 3: return attend<3>(q, k, v, valid, scale);
    case 4: return attend<4>(q, k, v, valid, scale);
    case 5: return attend<5>(q, k, v, valid, scale);
    case 6: return attend<6>(q, k, v, valid, scale);
    case 7: return attend<7>(q, k, v, valid, scale);
    case 8: return attend<8>(q, k, v, valid, scale);
    default: TORCH_CHECK(false, "at most 8 query heads per KV head");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_attention", &decode_attention); }
