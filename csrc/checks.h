// Input validation shared by the CPU kernels, with the package's exception policy: a wrong
// dtype is TORCH_CHECK_TYPE (Python TypeError), a wrong shape, device or value is
// TORCH_CHECK_VALUE (Python ValueError); the message names the op, the argument and what was
// expected.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace dynenc {

// Elements of work per parallel chunk (the value ATen uses for its own loops).
constexpr int64_t kGrain = 32768;

// Rows per parallel chunk when one row costs `work_per_row` elements of work.
inline int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, work_per_row));
}

// The dtypes the kernels are dispatched for.
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", s);
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must be ", rank, "-D, got shape ", t.sizes());
}

// `t` must live on the same device as, and have the dtype of, `ref`.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// `t` must be a companion of `ref`: on its device, of its dtype, and of the given shape.
inline void check_matches(const at::Tensor& t, const at::Tensor& ref, at::IntArrayRef shape, const char* op,
                          const char* name, const char* ref_name) {
  check_like(t, ref, op, name, ref_name);
  check_shape(t, shape, op, name);
}

// Validates cu_seqlens (int32 [B + 1], cu[0] == 0, non-decreasing, cu[B] == num_rows) and
// returns it contiguous. The kernels index rows through it, so this is what keeps them in bounds.
inline at::Tensor check_cu_seqlens(const at::Tensor& cu_seqlens, int64_t num_rows, const at::Tensor& ref,
                                   const char* op) {
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.device() == ref.device(), op, ": cu_seqlens is on ", cu_seqlens.device(),
              " but the data is on ", ref.device());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, op,
              ": cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape ", cu_seqlens.sizes());
  at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK_VALUE(c[0] == 0, op, ": cu_seqlens[0] must be 0, got ", c[0]);
  for (int64_t b = 1; b < n; ++b) {
    TORCH_CHECK_VALUE(c[b] >= c[b - 1], op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", b - 1,
                "] = ", c[b - 1], " > cu_seqlens[", b, "] = ", c[b]);
  }
  TORCH_CHECK_VALUE(c[n - 1] == num_rows, op, ": cu_seqlens[-1] must equal the number of rows ", num_rows,
              ", got ", c[n - 1]);
  return cu;
}

// Validates a row index (int64 1-D, values in [0, num_rows)) and returns it contiguous.
inline at::Tensor check_index(const at::Tensor& index, int64_t num_rows, const at::Tensor& ref,
                              const char* op) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.device() == ref.device(), op, ": index is on ", index.device(), " but the data is on ",
              ref.device());
  check_rank(index, 1, op, "index");
  at::Tensor idx = index.contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  at::parallel_for(0, idx.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      // One unsigned compare catches both negative and too-large values.
      TORCH_CHECK_VALUE(static_cast<uint64_t>(p[j]) < static_cast<uint64_t>(num_rows), op, ": index[", j,
                  "] = ", p[j], " is out of range, expected values in [0, ", num_rows, ")");
    }
  });
  return idx;
}

// slot[r] = j where index[j] == r, and -1 for rows the (in-range) index does not hit. Raises on
// a duplicate, which would make a scatter's result depend on write order.
inline std::vector<int64_t> index_slots(const at::Tensor& idx, int64_t num_rows, const char* op) {
  std::vector<int64_t> slot(num_rows, -1);
  const int64_t* p = idx.const_data_ptr<int64_t>();
  int64_t* s = slot.data();
  at::parallel_for(0, idx.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      // Atomic so two threads claiming the same row cannot both see it free.
      TORCH_CHECK_VALUE(__atomic_exchange_n(&s[p[j]], j, __ATOMIC_RELAXED) < 0, op, ": index contains row ", p[j],
                  " more than once, expected distinct rows");
    }
  });
  return slot;
}

}  // namespace dynenc
