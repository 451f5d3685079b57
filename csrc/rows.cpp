// Row ops over a packed [N, D] buffer: gather, scatter and the fused gated residual scatter
// (forward and backward). The scatter-type ops write every output row exactly once in one
// parallel sweep: active rows are computed from their inputs, and the runs of untouched rows
// between them are moved as whole memcpy/memset blocks instead of a clone followed by an
// overwrite.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstring>

#include <torch/library.h>

#include "checks.h"
#include "vectorize.h"

namespace dynenc {
namespace {

// The M active rows of an [N, D] buffer: index[j] (distinct) or, without an index, rows 0..M-1.
struct ActiveRows {
  int64_t num_active = 0, num_rows = 0;
  bool indexed = false;
  std::vector<int64_t> slot;  // with an index: slot[r] = j if index[j] == r, else -1
};

// Validates `index` (distinct, in range, one entry per row of y) or the prefix case.
ActiveRows active_rows(const std::optional<at::Tensor>& index, int64_t num_active, int64_t num_rows,
                       const at::Tensor& ref, const char* op) {
  ActiveRows rows;
  rows.num_active = num_active;
  rows.num_rows = num_rows;
  if (!index) {
    TORCH_CHECK_VALUE(num_active <= num_rows, op, ": y has ", num_active, " rows but the output only ", num_rows,
                " (with index=None, y holds rows 0..M-1)");
    return rows;
  }
  const at::Tensor idx = check_index(*index, num_rows, ref, op);
  TORCH_CHECK_VALUE(idx.numel() == num_active, op, ": index has ", idx.numel(), " entries but y has ", num_active,
              " rows");
  rows.indexed = true;
  rows.slot = index_slots(idx, num_rows, op);
  return rows;
}

// Rows looked up out of order (by index) are prefetched this many rows ahead.
constexpr int64_t kPrefetchDistance = 4;

// Prefetches the start of a row; the hardware stream prefetcher follows on from there.
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < std::min<int64_t>(bytes, 2048); off += 64) __builtin_prefetch(p + off);
}

// Writes every row of an [N, D] output exactly once, in parallel: active(j, r) for each active
// row r (from y's row j), rest(r0, r1) for each maximal run [r0, r1) of inactive rows.
// With an index this is one sweep in increasing row order, so the full-size buffers stream
// sequentially and only y's rows come in index order, fetched ahead by prefetch(j). (Visiting
// rows in index order instead made a random index ~2x slower than a sorted one.)
template <typename Prefetch, typename Active, typename Rest>
void for_each_row(const ActiveRows& rows, int64_t D, const Prefetch& prefetch, const Active& active,
                  const Rest& rest) {
  const int64_t grain = row_grain(D);
  if (!rows.indexed) {
    // Prefix case: two balanced sweeps, over the active rows and over the one inactive run.
    at::parallel_for(0, rows.num_active, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) active(r, r);
    });
    at::parallel_for(rows.num_active, rows.num_rows, grain, rest);
    return;
  }
  const int64_t* slot = rows.slot.data();
  at::parallel_for(0, rows.num_rows, grain, [&](int64_t begin, int64_t end) {
    // A second cursor runs kPrefetchDistance active rows ahead of the sweep, prefetching.
    int64_t ahead = begin;
    const auto prefetch_next = [&] {
      while (ahead < end && slot[ahead] < 0) ++ahead;
      if (ahead < end) prefetch(slot[ahead++]);
    };
    for (int64_t i = 0; i < kPrefetchDistance; ++i) prefetch_next();
    for (int64_t r = begin; r < end;) {
      for (; r < end && slot[r] >= 0; ++r) {
        prefetch_next();
        active(slot[r], r);
      }
      const int64_t r0 = r;
      while (r < end && slot[r] < 0) ++r;
      if (r > r0) rest(r0, r);
    }
  });
}

void check_rows_pair(const at::Tensor& x, const at::Tensor& y, const char* op) {
  check_rank(x, 2, op, "x");
  check_rank(y, 2, op, "y");
  check_floating(x, op, "x");
  check_like(y, x, op, "y", "x");
  TORCH_CHECK_VALUE(y.size(1) == x.size(1), op, ": y must have x's ", x.size(1), " columns, got shape ", y.sizes());
}

// The gate as a contiguous [M] tensor of x's dtype (the reference casts it to y.dtype before
// use, so the rounding matches), or undefined for gate = 1.
at::Tensor prepare_gate(const std::optional<at::Tensor>& gate, int64_t num_active, const at::Tensor& x,
                        const char* op) {
  if (!gate) return at::Tensor();
  check_floating(*gate, op, "gate");
  TORCH_CHECK_VALUE(gate->device() == x.device(), op, ": gate is on ", gate->device(), " but x is on ", x.device());
  check_shape(*gate, {num_active}, op, "gate");
  return gate->to(x.scalar_type()).contiguous();
}

// out = x + g * (y - x), one row.
template <typename scalar_t>
DYNENC_MULTIVERSION void lerp_row(scalar_t* out, const scalar_t* x, const scalar_t* y, at::opmath_type<scalar_t> g,
                                  int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const auto xv = to_opmath(x[d]);
    out[d] = from_opmath<scalar_t>(xv + g * (to_opmath(y[d]) - xv));
  }
}

// Sum over d of a[d] * (b[d] - c[d]) in opmath with 8 independent partial sums, so the loop
// vectorises without reassociation flags (one accumulator would serialise on add latency).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
inline opmath_t dot_diff(const scalar_t* a, const scalar_t* b, const scalar_t* c, int64_t n) {
  constexpr int64_t kLanes = 8;
  opmath_t lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += to_opmath(a[d + l]) * (to_opmath(b[d + l]) - to_opmath(c[d + l]));
    }
  }
  opmath_t sum = 0;
  for (; d < n; ++d) sum += to_opmath(a[d]) * (to_opmath(b[d]) - to_opmath(c[d]));
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// Backward of lerp_row for one row: grad_x = (1 - g) * grad_out, grad_y = g * grad_out, and
// returns the gate's gradient sum_d grad_out * (y - x). Two loops over the (L1-resident) row:
// fused into one, the reduced-precision versions did not vectorise.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
DYNENC_MULTIVERSION opmath_t lerp_backward_row(scalar_t* grad_x, scalar_t* grad_y, const scalar_t* grad_out,
                                               const scalar_t* x, const scalar_t* y, opmath_t g, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const opmath_t go = to_opmath(grad_out[d]);
    grad_x[d] = from_opmath<scalar_t>((opmath_t(1) - g) * go);
    grad_y[d] = from_opmath<scalar_t>(g * go);
  }
  return dot_diff(grad_out, y, x, D);
}

}  // namespace

at::Tensor gated_residual_scatter(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& gate,
                                  const std::optional<at::Tensor>& index) {
  constexpr const char* op = "gated_residual_scatter";
  check_rows_pair(x, y, op);
  const int64_t N = x.size(0), D = x.size(1), M = y.size(0);
  const ActiveRows rows = active_rows(index, M, N, x, op);
  const at::Tensor g = prepare_gate(gate, M, x, op);
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_row(
        rows, D, [&](int64_t j) { prefetch_row(yp + j * D, D * sizeof(scalar_t)); },
        [&](int64_t j, int64_t r) {
          const scalar_t* xr = xp + r * D;
          const scalar_t* yj = yp + j * D;
          scalar_t* orow = o + r * D;
          if (!gp) {
            std::memcpy(orow, yj, D * sizeof(scalar_t));
            return;
          }
          lerp_row(orow, xr, yj, to_opmath(gp[j]), D);
        },
        [&](int64_t r0, int64_t r1) { std::memcpy(o + r0 * D, xp + r0 * D, (r1 - r0) * D * sizeof(scalar_t)); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_residual_scatter_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& index) {
  constexpr const char* op = "gated_residual_scatter_backward";
  check_rows_pair(x, y, op);
  check_matches(grad_out, x, x.sizes(), op, "grad_out", "x");
  const int64_t N = x.size(0), D = x.size(1), M = y.size(0);
  const ActiveRows rows = active_rows(index, M, N, x, op);
  const at::Tensor g = prepare_gate(gate, M, x, op);
  const at::Tensor go = grad_out.contiguous(), xc = x.contiguous(), yc = y.contiguous();
  at::Tensor grad_x = at::empty_like(xc), grad_y = at::empty_like(yc);
  at::Tensor grad_gate;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // Reduced in opmath, cast to the gate's own dtype at the end (as autograd would).
    at::Tensor gg = at::empty({g.defined() ? M : 0}, x.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    opmath_t* ggp = gg.data_ptr<opmath_t>();
    for_each_row(
        rows, D,
        [&](int64_t j) {
          prefetch_row(yp + j * D, D * sizeof(scalar_t));
          prefetch_row(gy + j * D, D * sizeof(scalar_t));
        },
        [&](int64_t j, int64_t r) {
          const scalar_t* gor = gop + r * D;
          scalar_t* gxr = gx + r * D;
          scalar_t* gyj = gy + j * D;
          if (!gp) {  // out[r] = y[j]: the gradient moves to y and x[r] gets none
            std::memcpy(gyj, gor, D * sizeof(scalar_t));
            std::memset(gxr, 0, D * sizeof(scalar_t));
            return;
          }
          ggp[j] = lerp_backward_row(gxr, gyj, gor, xp + r * D, yp + j * D, to_opmath(gp[j]), D);
        },
        [&](int64_t r0, int64_t r1) { std::memcpy(gx + r0 * D, gop + r0 * D, (r1 - r0) * D * sizeof(scalar_t)); });
    grad_gate = g.defined() ? gg.to(gate->scalar_type()) : at::zeros({M}, x.options());
  });
  return {grad_x, grad_y, grad_gate};
}

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index) {
  constexpr const char* op = "gather_rows";
  check_rank(x, 2, op, "x");
  const int64_t D = x.size(1);
  const at::Tensor idx = check_index(index, x.size(0), x, op);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({idx.numel(), D}, xc.options());
  // Byte copies: any dtype works, and no dispatch is needed.
  const int64_t row_bytes = D * xc.element_size();
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* p = idx.const_data_ptr<int64_t>();
  at::parallel_for(0, idx.numel(), row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (j + kPrefetchDistance < end) prefetch_row(src + p[j + kPrefetchDistance] * row_bytes, row_bytes);
      std::memcpy(dst + j * row_bytes, src + p[j] * row_bytes, row_bytes);
    }
  });
  return out;
}

at::Tensor scatter_rows(const at::Tensor& y, const at::Tensor& index, int64_t num_rows) {
  constexpr const char* op = "scatter_rows";
  check_rank(y, 2, op, "y");
  TORCH_CHECK_VALUE(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  const int64_t D = y.size(1);
  const ActiveRows rows = active_rows(index, y.size(0), num_rows, y, op);
  const at::Tensor yc = y.contiguous();
  at::Tensor out = at::empty({num_rows, D}, yc.options());
  const int64_t row_bytes = D * yc.element_size();
  const char* src = static_cast<const char*>(yc.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for_each_row(
      rows, D, [&](int64_t j) { prefetch_row(src + j * row_bytes, row_bytes); },
      [&](int64_t j, int64_t r) { std::memcpy(dst + r * row_bytes, src + j * row_bytes, row_bytes); },
      [&](int64_t r0, int64_t r1) { std::memset(dst + r0 * row_bytes, 0, (r1 - r0) * row_bytes); });
  return out;
}

}  // namespace dynenc

// Schemas and CPU kernels of the row ops (the op table: dynenc/ops/registry.py).
TORCH_LIBRARY_FRAGMENT(dynenc, m) {
  m.def("gated_residual_scatter(Tensor x, Tensor y, Tensor? gate, Tensor? index) -> Tensor");
  m.def("gated_residual_scatter_backward(Tensor grad_out, Tensor x, Tensor y, Tensor? gate, Tensor? index)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_rows(Tensor y, Tensor index, SymInt num_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(dynenc, CPU, m) {
  m.impl("gated_residual_scatter", &dynenc::gated_residual_scatter);
  m.impl("gated_residual_scatter_backward", &dynenc::gated_residual_scatter_backward);
  m.impl("gather_rows", &dynenc::gather_rows);
  m.impl("scatter_rows", &dynenc::scatter_rows);
}
