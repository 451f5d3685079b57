// Residual add fused with the LayerNorm of the sum, over a packed [N, D] buffer:
// sum = x + alpha * residual, out = LayerNorm(sum) over D (biased variance, eps inside the
// square root), with the per-row mean and 1 / std returned for the backward.
//
// Each row is handled by one thread in three sweeps over L1-resident data: the sum (stored,
// and kept in opmath in a per-thread row buffer so the statistics read the rounded values the
// caller gets back), a two-pass mean / variance, and the affine output. The backward recomputes
// x_hat from the sum and the statistics; the weight / bias gradients reduce over all rows in
// fixed row chunks with their own partials (deterministic, race-free), summed at the end.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <vector>

#include <torch/library.h>

#include "checks.h"
#include "vectorize.h"

namespace dynenc {
namespace {

// Independent partial sums, so reductions vectorise without reassociation flags.
constexpr int64_t kLanes = 8;

// s[d] = x[d] + alpha * r[d] rounded to scalar_t, stored to out and (in opmath) to acc.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
DYNENC_MULTIVERSION void add_row(scalar_t* out, opmath_t* acc, const scalar_t* x, const scalar_t* r, opmath_t alpha,
                                 int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t s = from_opmath<scalar_t>(to_opmath(x[d]) + alpha * to_opmath(r[d]));
    out[d] = s;
    acc[d] = to_opmath(s);
  }
}

// Sum of v[d] (shift = 0) or of (v[d] - shift)^2 (squares = true).
template <bool Squares, typename opmath_t>
DYNENC_MULTIVERSION opmath_t row_sum(const opmath_t* v, opmath_t shift, int64_t D) {
  opmath_t lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const opmath_t c = v[d + l] - shift;
      lanes[l] += Squares ? c * c : c;
    }
  }
  opmath_t sum = 0;
  for (; d < D; ++d) {
    const opmath_t c = v[d] - shift;
    sum += Squares ? c * c : c;
  }
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// out[d] = (s[d] - mean) * rstd * w[d] + b[d] (w, b: opmath copies, or null for 1 / 0).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
DYNENC_MULTIVERSION void normalize_row(scalar_t* out, const opmath_t* s, opmath_t mean, opmath_t rstd,
                                       const opmath_t* w, const opmath_t* b, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    opmath_t y = (s[d] - mean) * rstd;
    if (w) y *= w[d];
    if (b) y += b[d];
    out[d] = from_opmath<scalar_t>(y);
  }
}

// The backward of one row. With x_hat = (s - mean) * rstd and g = grad_out * w:
//   grad_s = rstd * (g - x_hat * mean_d(g * x_hat) - mean_d(g)) + grad_sum,
//   grad_x = grad_s, grad_residual = alpha * grad_s,
// and the row's terms of grad_w (grad_out * x_hat) and grad_b (grad_out) are added to pw, pb.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
DYNENC_MULTIVERSION void backward_row(scalar_t* gx, scalar_t* gr, opmath_t* pw, opmath_t* pb, opmath_t* xhat,
                                      opmath_t* g, const scalar_t* go, const scalar_t* gs, const scalar_t* s,
                                      opmath_t mean, opmath_t rstd, const opmath_t* w, opmath_t alpha, int64_t D) {
  opmath_t lanes_gx[kLanes] = {}, lanes_g[kLanes] = {};
  for (int64_t d = 0; d < D; ++d) {
    const opmath_t gov = to_opmath(go[d]);
    xhat[d] = (to_opmath(s[d]) - mean) * rstd;
    g[d] = w ? gov * w[d] : gov;
    pw[d] += gov * xhat[d];
    pb[d] += gov;
  }
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes_gx[l] += g[d + l] * xhat[d + l];
      lanes_g[l] += g[d + l];
    }
  }
  opmath_t sum_gx = 0, sum_g = 0;
  for (; d < D; ++d) {
    sum_gx += g[d] * xhat[d];
    sum_g += g[d];
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    sum_gx += lanes_gx[l];
    sum_g += lanes_g[l];
  }
  const opmath_t c1 = sum_gx / opmath_t(D), c2 = sum_g / opmath_t(D);
  for (int64_t e = 0; e < D; ++e) {
    opmath_t v = (g[e] - xhat[e] * c1 - c2) * rstd;
    if (gs) v += to_opmath(gs[e]);
    gx[e] = from_opmath<scalar_t>(v);
    gr[e] = from_opmath<scalar_t>(alpha * v);
  }
}

// A [D] affine parameter of x's dtype and device, as a contiguous opmath copy (undefined if absent).
at::Tensor prepare_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* op, const char* name) {
  if (!p) return at::Tensor();
  check_matches(*p, x, {x.size(1)}, op, name, "x");
  return p->to(at::toOpMathType(x.scalar_type())).contiguous();
}

void check_stat(const at::Tensor& stat, const at::Tensor& sum, const char* op, const char* name) {
  const at::ScalarType expected = at::toOpMathType(sum.scalar_type());
  TORCH_CHECK_TYPE(stat.scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ",
                   stat.scalar_type());
  TORCH_CHECK_VALUE(stat.device() == sum.device(), op, ": ", name, " is on ", stat.device(), " but sum is on ",
                    sum.device());
  check_shape(stat, {sum.size(0)}, op, name);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm(
    const at::Tensor& x, const at::Tensor& residual, double alpha, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "add_layer_norm";
  check_rank(x, 2, op, "x");
  check_floating(x, op, "x");
  TORCH_CHECK_VALUE(x.size(1) >= 1, op, ": x must have at least one feature, got shape ", x.sizes());
  check_matches(residual, x, x.sizes(), op, "residual", "x");
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  const at::Tensor w = prepare_param(weight, x, op, "weight"), b = prepare_param(bias, x, op, "bias");
  const int64_t N = x.size(0), D = x.size(1);
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  at::Tensor sum = at::empty_like(xc), out = at::empty_like(xc);
  const auto stat_options = xc.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor mean = at::empty({N}, stat_options), rstd = at::empty({N}, stat_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const opmath_t* wp = w.defined() ? w.const_data_ptr<opmath_t>() : nullptr;
    const opmath_t* bp = b.defined() ? b.const_data_ptr<opmath_t>() : nullptr;
    scalar_t* sp = sum.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    opmath_t* mp = mean.data_ptr<opmath_t>();
    opmath_t* rsp = rstd.data_ptr<opmath_t>();
    at::parallel_for(0, N, row_grain(D), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> row(D);
      for (int64_t n = begin; n < end; ++n) {
        add_row(sp + n * D, row.data(), xp + n * D, rp + n * D, opmath_t(alpha), D);
        const opmath_t m = row_sum<false>(row.data(), opmath_t(0), D) / opmath_t(D);
        const opmath_t var = row_sum<true>(row.data(), m, D) / opmath_t(D);
        const opmath_t r = opmath_t(1) / std::sqrt(var + opmath_t(eps));
        normalize_row(op_ + n * D, row.data(), m, r, wp, bp, D);
        mp[n] = m;
        rsp[n] = r;
      }
    });
  });
  return {sum, out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const at::Tensor& sum,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, double alpha) {
  constexpr const char* op = "add_layer_norm_backward";
  check_rank(sum, 2, op, "sum");
  check_floating(sum, op, "sum");
  TORCH_CHECK_VALUE(sum.size(1) >= 1, op, ": sum must have at least one feature, got shape ", sum.sizes());
  check_matches(grad_out, sum, sum.sizes(), op, "grad_out", "sum");
  if (grad_sum) {
    check_matches(*grad_sum, sum, sum.sizes(), op, "grad_sum", "sum");
  }
  check_stat(mean, sum, op, "mean");
  check_stat(rstd, sum, op, "rstd");
  const at::Tensor w = prepare_param(weight, sum, op, "weight");
  const int64_t N = sum.size(0), D = sum.size(1);
  const at::Tensor go = grad_out.contiguous(), sc = sum.contiguous(), mc = mean.contiguous(),
                   rc = rstd.contiguous();
  const at::Tensor gs = grad_sum ? grad_sum->contiguous() : at::Tensor();
  at::Tensor grad_x = at::empty_like(sc), grad_residual = at::empty_like(sc);
  // Each of P fixed row chunks accumulates its own [2, D] partial (row 0: weight, row 1: bias).
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / row_grain(D)));
  at::Tensor partial = at::zeros({P, 2, D}, sc.options().dtype(at::toOpMathType(sum.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sum.scalar_type(), op, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    const scalar_t* gsp = gs.defined() ? gs.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = sc.const_data_ptr<scalar_t>();
    const opmath_t* mp = mc.const_data_ptr<opmath_t>();
    const opmath_t* rsp = rc.const_data_ptr<opmath_t>();
    const opmath_t* wp = w.defined() ? w.const_data_ptr<opmath_t>() : nullptr;
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* grp = grad_residual.data_ptr<scalar_t>();
    opmath_t* part = partial.data_ptr<opmath_t>();
    at::parallel_for(0, P, 1, [&](int64_t p_begin, int64_t p_end) {
      std::vector<opmath_t> xhat(D), g(D);
      for (int64_t p = p_begin; p < p_end; ++p) {
        opmath_t* pw = part + p * 2 * D;
        for (int64_t n = N * p / P; n < N * (p + 1) / P; ++n) {
          backward_row(gxp + n * D, grp + n * D, pw, pw + D, xhat.data(), g.data(), gop + n * D,
                       gsp ? gsp + n * D : nullptr, sp + n * D, mp[n], rsp[n], wp, opmath_t(alpha), D);
        }
      }
    });
  });
  const at::Tensor total = partial.sum(0);  // [2, D]
  // Copies: two views of one buffer would be outputs that alias each other.
  at::Tensor grad_weight = total[0].to(weight ? weight->scalar_type() : sum.scalar_type(), false, true);
  at::Tensor grad_bias = total[1].to(sum.scalar_type(), false, true);
  return {grad_x, grad_residual, grad_weight, grad_bias};
}

}  // namespace dynenc

// Schemas and CPU kernels of the fused residual add + LayerNorm (the op table: dynenc/ops/registry.py).
TORCH_LIBRARY_FRAGMENT(dynenc, m) {
  m.def("add_layer_norm(Tensor x, Tensor residual, float alpha, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("add_layer_norm_backward(Tensor grad_out, Tensor? grad_sum, Tensor sum, Tensor mean, Tensor rstd,"
        " Tensor? weight, float alpha) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynenc, CPU, m) {
  m.impl("add_layer_norm", &dynenc::add_layer_norm);
  m.impl("add_layer_norm_backward", &dynenc::add_layer_norm_backward);
}
