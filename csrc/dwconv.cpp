// Depthwise 'same' conv1d over packed channels-last sequences: output row t sums the taps
// whose input row lies inside t's own sequence (zero padding at every sequence edge).
//
// Rows are processed in parallel chunks, each chunk in blocks of kBlock output rows: the block's
// input rows plus a (K - 1) / 2 halo on each side are converted once to opmath (a no-op view for
// float / double), so half / bfloat16 rows are not re-converted for each of the K taps. Inner
// loops run over channels with weights laid out [K, C], which the compiler vectorises.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <type_traits>
#include <vector>

#include <torch/library.h>

#include "checks.h"
#include "vectorize.h"

namespace dynenc {
namespace {

constexpr int64_t kBlock = 64;

// Walks rows in increasing order and tracks the sequence [start, end) holding the current row.
class SeqCursor {
 public:
  SeqCursor(const int32_t* cu, int64_t num_seqs, int64_t row)
      // The last b with cu[b] <= row: skips zero-length sequences that end where row starts.
      : cu_(cu), b_(std::upper_bound(cu, cu + num_seqs + 1, row) - cu - 1) {}
  void seek(int64_t row) {
    while (cu_[b_ + 1] <= row) ++b_;
  }
  int64_t start() const { return cu_[b_]; }
  int64_t end() const { return cu_[b_ + 1]; }

 private:
  const int32_t* cu_;
  int64_t b_;
};

template <typename scalar_t>
DYNENC_MULTIVERSION void convert_to_opmath(at::opmath_type<scalar_t>* dst, const scalar_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_opmath(src[i]);
}

template <typename scalar_t>
DYNENC_MULTIVERSION void store_row(scalar_t* dst, const at::opmath_type<scalar_t>* acc, int64_t C) {
  for (int64_t c = 0; c < C; ++c) dst[c] = from_opmath<scalar_t>(acc[c]);
}

// Rows [h0, h1) of a row-major [*, C] buffer as opmath values: a pointer into the buffer itself
// when no conversion is needed, else a converted copy in `buf`.
template <typename scalar_t, typename opmath_t>
const opmath_t* load_rows(const scalar_t* src, int64_t h0, int64_t h1, int64_t C, std::vector<opmath_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return src + h0 * C;
  } else {
    buf.resize((h1 - h0) * C);
    convert_to_opmath(buf.data(), src + h0 * C, (h1 - h0) * C);
    return buf.data();
  }
}

// Calls f(t, in, k0, k1) for each row t of the chunk [begin, end), block by block: the taps k in
// [k0, k1) are exactly those whose input row t - pad + k lies inside t's sequence, and in[i]
// points at opmath row t - pad + k0 (the first valid tap) of inputs[i].
template <typename scalar_t, typename opmath_t, size_t NumInputs, typename F>
void for_each_conv_row(int64_t begin, int64_t end, int64_t N, int64_t C, int64_t K, const int32_t* cu, int64_t B,
                       const std::array<const scalar_t*, NumInputs>& inputs, const F& f) {
  const int64_t pad = (K - 1) / 2;
  std::array<std::vector<opmath_t>, NumInputs> bufs;
  std::array<const opmath_t*, NumInputs> rows;
  SeqCursor seq(cu, B, begin);
  for (int64_t t0 = begin; t0 < end; t0 += kBlock) {
    const int64_t t1 = std::min(end, t0 + kBlock);
    const int64_t h0 = std::max<int64_t>(0, t0 - pad), h1 = std::min(N, t1 + pad);
    std::array<const opmath_t*, NumInputs> base;
    for (size_t i = 0; i < NumInputs; ++i) base[i] = load_rows(inputs[i], h0, h1, C, bufs[i]);
    for (int64_t t = t0; t < t1; ++t) {
      seq.seek(t);
      const int64_t k0 = std::max<int64_t>(0, seq.start() - t + pad);
      const int64_t k1 = std::min<int64_t>(K, seq.end() - t + pad);
      for (size_t i = 0; i < NumInputs; ++i) rows[i] = base[i] + (t - pad + k0 - h0) * C;
      f(t, rows, k0, k1);
    }
  }
}

// acc = init (or 0) + sum_{k in [k0, k1)} w[k] * in[k - k0]; w is [K, C], in holds rows of C.
template <typename opmath_t>
DYNENC_MULTIVERSION void conv_row(opmath_t* acc, const opmath_t* init, const opmath_t* w, const opmath_t* in,
                                  int64_t k0, int64_t k1, int64_t C) {
  for (int64_t c = 0; c < C; ++c) acc[c] = init ? init[c] : opmath_t(0);
  for (int64_t k = k0; k < k1; ++k) {
    const opmath_t* wk = w + k * C;
    const opmath_t* xk = in + (k - k0) * C;
    for (int64_t c = 0; c < C; ++c) acc[c] += wk[c] * xk[c];
  }
}

// Weight / bias gradient of one output row g: grad_w[k] += g * in[k - k0] for k in [k0, k1),
// grad_b += g.
template <typename opmath_t>
DYNENC_MULTIVERSION void accumulate_taps(opmath_t* grad_w, opmath_t* grad_b, const opmath_t* g, const opmath_t* in,
                                         int64_t k0, int64_t k1, int64_t C) {
  for (int64_t c = 0; c < C; ++c) grad_b[c] += g[c];
  for (int64_t k = k0; k < k1; ++k) {
    opmath_t* gwk = grad_w + k * C;
    const opmath_t* xk = in + (k - k0) * C;
    for (int64_t c = 0; c < C; ++c) gwk[c] += g[c] * xk[c];
  }
}

// Shared validation; returns cu_seqlens contiguous.
at::Tensor check_conv_args(const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& weight,
                           const char* op) {
  check_rank(x, 2, op, "x");
  check_floating(x, op, "x");
  check_rank(weight, 2, op, "weight");
  check_like(weight, x, op, "weight", "x");
  TORCH_CHECK_VALUE(weight.size(0) == x.size(1), op, ": weight must be [C, K] with C = ", x.size(1),
              " channels of x, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) % 2 == 1, op, ": weight must be [C, K] with an odd kernel size K, got K = ",
              weight.size(1));
  return check_cu_seqlens(cu_seqlens, x.size(0), x, op);
}

// weight [C, K] as opmath [K, C] (taps outermost, so the channel loops are contiguous);
// `flip` reverses the taps, which turns the forward conv into its input gradient.
at::Tensor taps_major(const at::Tensor& weight, bool flip) {
  const at::Tensor w = flip ? weight.flip(1) : weight;
  return w.to(at::toOpMathType(weight.scalar_type())).t().contiguous();
}

}  // namespace

at::Tensor varlen_dwconv1d(const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "varlen_dwconv1d";
  const at::Tensor cu = check_conv_args(x, cu_seqlens, weight, op);
  const int64_t N = x.size(0), C = x.size(1), K = weight.size(1), B = cu.numel() - 1;
  at::Tensor b;
  if (bias) {
    check_matches(*bias, x, {C}, op, "bias", "x");
    b = bias->to(at::toOpMathType(x.scalar_type())).contiguous();
  }
  const at::Tensor xc = x.contiguous(), w = taps_major(weight, false);
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    const opmath_t* bp = b.defined() ? b.const_data_ptr<opmath_t>() : nullptr;
    const int32_t* cup = cu.const_data_ptr<int32_t>();
    const std::array<const scalar_t*, 1> inputs{xc.const_data_ptr<scalar_t>()};
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(C * K), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> acc(C);
      for_each_conv_row<scalar_t, opmath_t>(begin, end, N, C, K, cup, B, inputs,
                                            [&](int64_t t, const auto& in, int64_t k0, int64_t k1) {
                                              conv_row(acc.data(), bp, wp, in[0], k0, k1, C);
                                              store_row(o + t * C, acc.data(), C);
                                            });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_dwconv1d_backward(const at::Tensor& grad_out,
                                                                        const at::Tensor& x,
                                                                        const at::Tensor& cu_seqlens,
                                                                        const at::Tensor& weight) {
  constexpr const char* op = "varlen_dwconv1d_backward";
  const at::Tensor cu = check_conv_args(x, cu_seqlens, weight, op);
  check_matches(grad_out, x, x.sizes(), op, "grad_out", "x");
  const int64_t N = x.size(0), C = x.size(1), K = weight.size(1), B = cu.numel() - 1;
  const at::Tensor go = grad_out.contiguous(), xc = x.contiguous(), w_flip = taps_major(weight, true);
  at::Tensor grad_x = at::empty_like(xc);
  // The weight / bias gradients reduce over all rows: each of P fixed row chunks accumulates
  // its own [K + 1, C] partial (row K: bias), summed afterwards. Fixed chunks (not thread ids)
  // keep the result deterministic and race-free.
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / row_grain(C * K)));
  at::Tensor partial = at::zeros({P, K + 1, C}, xc.options().dtype(at::toOpMathType(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* wp = w_flip.const_data_ptr<opmath_t>();
    const int32_t* cup = cu.const_data_ptr<int32_t>();
    const std::array<const scalar_t*, 2> inputs{go.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>()};
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    opmath_t* part = partial.data_ptr<opmath_t>();
    const int64_t pad = (K - 1) / 2;
    at::parallel_for(0, P, 1, [&](int64_t p_begin, int64_t p_end) {
      std::vector<opmath_t> acc(C);
      for (int64_t p = p_begin; p < p_end; ++p) {
        opmath_t* gw = part + p * (K + 1) * C;
        opmath_t* gb = gw + K * C;
        for_each_conv_row<scalar_t, opmath_t>(
            N * p / P, N * (p + 1) / P, N, C, K, cup, B, inputs,
            [&](int64_t t, const auto& in, int64_t k0, int64_t k1) {
              // grad_x[t] = sum_k w[K-1-k] * grad_out[t - pad + k]: the same taps, flipped.
              conv_row(acc.data(), static_cast<const opmath_t*>(nullptr), wp, in[0], k0, k1, C);
              store_row(gx + t * C, acc.data(), C);
              // grad_w[k] += grad_out[t] * x[t - pad + k]; grad_b += grad_out[t].
              accumulate_taps(gw, gb, in[0] + (pad - k0) * C, in[1], k0, k1, C);
            });
      }
    });
  });
  const at::Tensor total = partial.sum(0);  // [K + 1, C]
  at::Tensor grad_w = total.narrow(0, 0, K).t().to(weight.scalar_type()).contiguous();
  at::Tensor grad_b = total[K].to(x.scalar_type());
  return {grad_x, grad_w, grad_b};
}

}  // namespace dynenc

// Schemas and CPU kernels of the depthwise conv ops (the op table: dynenc/ops/registry.py).
TORCH_LIBRARY_FRAGMENT(dynenc, m) {
  m.def("varlen_dwconv1d(Tensor x, Tensor cu_seqlens, Tensor weight, Tensor? bias) -> Tensor");
  m.def("varlen_dwconv1d_backward(Tensor grad_out, Tensor x, Tensor cu_seqlens, Tensor weight)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynenc, CPU, m) {
  m.impl("varlen_dwconv1d", &dynenc::varlen_dwconv1d);
  m.impl("varlen_dwconv1d_backward", &dynenc::varlen_dwconv1d_backward);
}
