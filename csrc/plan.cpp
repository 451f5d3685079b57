// Execution plan of a ragged-depth stack: per-layer active row lists and compact cu_seqlens
// from a [L, N] row mask. Layers are independent, so both passes run in parallel over layers
// with a sequential scan inside each: one to count (per sequence, hence per layer), and after
// an O(L) prefix sum for the layer offsets, one to write the row numbers.
#include <torch/library.h>

#include "checks.h"

namespace dynenc {

std::tuple<at::Tensor, at::Tensor, at::Tensor> build_plan(const at::Tensor& row_mask, const at::Tensor& cu_seqlens) {
  constexpr const char* op = "build_plan";
  TORCH_CHECK_TYPE(row_mask.scalar_type() == at::kBool, op, ": row_mask must be bool, got ", row_mask.scalar_type());
  check_rank(row_mask, 2, op, "row_mask");
  const int64_t L = row_mask.size(0), N = row_mask.size(1);
  const at::Tensor cu = check_cu_seqlens(cu_seqlens, N, row_mask, op);
  const int64_t B = cu.numel() - 1;
  const at::Tensor mask = row_mask.contiguous();
  // A bool is one byte holding 0 or 1, so it can be summed as a count.
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const int32_t* c = cu.const_data_ptr<int32_t>();

  at::Tensor active_cu = at::empty({L, B + 1}, cu.options());
  int32_t* ac = active_cu.data_ptr<int32_t>();
  const int64_t grain = row_grain(N);
  at::parallel_for(0, L, grain, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const uint8_t* ml = m + l * N;
      int32_t* acl = ac + l * (B + 1);
      int32_t count = 0;  // <= N, which fits int32 because cu_seqlens does
      acl[0] = 0;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = c[b]; t < c[b + 1]; ++t) count += ml[t];
        acl[b + 1] = count;
      }
    }
  });

  at::Tensor offsets = at::empty({L + 1}, cu.options().dtype(at::kLong));
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t l = 0; l < L; ++l) off[l + 1] = off[l] + ac[l * (B + 1) + B];

  at::Tensor indices = at::empty({off[L]}, offsets.options());
  int64_t* idx = indices.data_ptr<int64_t>();
  at::parallel_for(0, L, grain, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const uint8_t* ml = m + l * N;
      int64_t* dst = idx + off[l];
      for (int64_t t = 0; t < N; ++t) {
        if (ml[t]) *dst++ = t;
      }
    }
  });
  return {indices, offsets, active_cu};
}

}  // namespace dynenc

// Schema and CPU kernel of the plan op (the op table: dynenc/ops/registry.py).
TORCH_LIBRARY_FRAGMENT(dynenc, m) {
  m.def("build_plan(Tensor row_mask, Tensor cu_seqlens) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynenc, CPU, m) {
  m.impl("build_plan", &dynenc::build_plan);
}
