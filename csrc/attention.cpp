// Block-diagonal attention over packed sequences: each sequence runs through ATen's CPU
// flash-attention kernels as a [1, H, T, Dh] view of the packed [N, H, Dh] buffers (no copy
// in; their output and logsumexp come back laid out [1, T, H, ...], so copying them into the
// packed results is a contiguous move).
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <torch/library.h>

#include "checks.h"

namespace dynenc {
namespace {

// Below this many multiply-adds (T^2 * H * Dh) a sequence never gets a parallel kernel call
// to itself: a thread fork/join would cost about as much as its work.
constexpr int64_t kMinParallelCost = int64_t{1} << 20;

// Calls fn(start, len) once per non-empty sequence. A sequence holding a large share of the
// work runs alone, with the ATen kernel parallelising over heads and query blocks inside. The
// others are split into contiguous cost-balanced groups, one per thread, whose kernel calls run
// inline on that thread: one fork/join for all of them instead of one per sequence, which for
// short sequences can exceed their work (and stalls badly on a loaded machine).
template <typename F>
void for_each_sequence(const std::vector<int32_t>& cu, int64_t heads, int64_t head_dim, const F& fn) {
  const int64_t threads = at::get_num_threads();
  const auto cost = [&](size_t b) {
    const int64_t len = cu[b + 1] - cu[b];
    // >= 1 for a non-empty sequence, so the group split below sees strictly increasing sums.
    return len == 0 ? 0 : std::max<int64_t>(1, len * len * heads * head_dim);
  };
  int64_t all_cost = 0;
  for (size_t b = 0; b + 1 < cu.size(); ++b) all_cost += cost(b);
  const int64_t long_cost = std::max(kMinParallelCost, all_cost / (2 * threads));
  std::vector<int64_t> short_seqs, prefix_cost{0};
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    if (cu[b + 1] == cu[b]) continue;  // owns no rows
    if (cost(b) >= long_cost) {
      fn(cu[b], cu[b + 1] - cu[b]);
    } else {
      short_seqs.push_back(b);
      prefix_cost.push_back(prefix_cost.back() + cost(b));
    }
  }
  const int64_t groups = std::min<int64_t>(threads, short_seqs.size());
  const int64_t total = prefix_cost.back();
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    // Worker threads do not inherit the caller's below-autograd dispatch state; without this
    // the per-sequence kernel calls would record autograd graphs for inputs requiring grad.
    c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
    // Group g takes the sequences whose cost interval starts in [g, g + 1) * total / groups.
    const auto first = [&](int64_t g) {
      return std::lower_bound(prefix_cost.begin(), prefix_cost.end() - 1, total * g / groups) - prefix_cost.begin();
    };
    for (int64_t i = first(g_begin); i < first(g_end); ++i) {
      const int64_t b = short_seqs[i];
      fn(cu[b], cu[b + 1] - cu[b]);
    }
  });
}

// Rows [start, start + len) of a packed [N, H, ...] tensor as the [1, H, len, ...] view the
// flash kernels take.
// q/k/v as the CPU flash kernel reads them: any row and head strides (views of one packed
// [N, 3, H, Dh] projection need no copy), contiguous columns.
at::Tensor columns_contiguous(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

at::Tensor seq_view(const at::Tensor& t, int64_t start, int64_t len) {
  return t.narrow(0, start, len).unsqueeze(0).transpose(1, 2);
}

// Validates q, k, v (and cu_seqlens) and returns cu_seqlens as a host vector.
std::vector<int32_t> check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_seqlens, int64_t max_seqlen, const char* op) {
  check_rank(q, 3, op, "q");
  check_floating(q, op, "q");
  check_matches(k, q, q.sizes(), op, "k", "q");
  check_matches(v, q, q.sizes(), op, "v", "q");
  TORCH_CHECK_VALUE(q.size(1) >= 1 && q.size(2) >= 1, op,
                    ": q must have at least one head and head_dim >= 1, got shape ", q.sizes());
  const at::Tensor cu = check_cu_seqlens(cu_seqlens, q.size(0), q, op);
  const int32_t* p = cu.const_data_ptr<int32_t>();
  std::vector<int32_t> bounds(p, p + cu.numel());
  // max_seqlen sizes the GPU launch grid; it is checked here too so both backends agree.
  int64_t longest = 0;
  for (size_t b = 1; b < bounds.size(); ++b) longest = std::max<int64_t>(longest, bounds[b] - bounds[b - 1]);
  TORCH_CHECK_VALUE(max_seqlen >= longest, op, ": max_seqlen must be >= the longest sequence (", longest,
                    "), got ", max_seqlen);
  return bounds;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale) {
  constexpr const char* op = "varlen_attention";
  const std::vector<int32_t> cu = check_qkv(q, k, v, cu_seqlens, max_seqlen, op);
  const at::Tensor qc = columns_contiguous(q), kc = columns_contiguous(k), vc = columns_contiguous(v);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  for_each_sequence(cu, q.size(1), q.size(2), [&](int64_t start, int64_t len) {
    auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(
        seq_view(qc, start, len), seq_view(kc, start, len), seq_view(vc, start, len), /*dropout_p=*/0.0,
        /*is_causal=*/false, /*attn_mask=*/{}, scale);
    seq_view(out, start, len).copy_(o);
    seq_view(lse, start, len).copy_(l);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& logsumexp, const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale) {
  constexpr const char* op = "varlen_attention_backward";
  const std::vector<int32_t> cu = check_qkv(q, k, v, cu_seqlens, max_seqlen, op);
  check_matches(grad_out, q, q.sizes(), op, "grad_out", "q");
  check_matches(out, q, q.sizes(), op, "out", "q");
  TORCH_CHECK_TYPE(logsumexp.scalar_type() == at::kFloat, op, ": logsumexp must be float32, got ",
              logsumexp.scalar_type());
  check_shape(logsumexp, {q.size(0), q.size(1)}, op, "logsumexp");
  // The float64 kernel reads a float64 logsumexp; widening the stored float32 one would cost
  // float64 its precision, so that (test-only) dtype recomputes it per sequence instead.
  const bool recompute_lse = q.scalar_type() == at::kDouble;
  const at::Tensor go = grad_out.contiguous(), qc = columns_contiguous(q), kc = columns_contiguous(k),
                   vc = columns_contiguous(v), oc = out.contiguous(), lc = logsumexp.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options()), grad_k = at::empty(k.sizes(), k.options()),
             grad_v = at::empty(v.sizes(), v.options());
  for_each_sequence(cu, q.size(1), q.size(2), [&](int64_t start, int64_t len) {
    const at::Tensor qs = seq_view(qc, start, len), ks = seq_view(kc, start, len), vs = seq_view(vc, start, len);
    const at::Tensor lse =
        recompute_lse ? std::get<1>(at::_scaled_dot_product_flash_attention_for_cpu(qs, ks, vs, 0.0, false, {}, scale))
                      : seq_view(lc, start, len);
    auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        seq_view(go, start, len), qs, ks, vs, seq_view(oc, start, len), lse, /*dropout_p=*/0.0,
        /*is_causal=*/false, /*attn_mask=*/{}, scale);
    seq_view(grad_q, start, len).copy_(gq);
    seq_view(grad_k, start, len).copy_(gk);
    seq_view(grad_v, start, len).copy_(gv);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace dynenc

// Schemas and CPU kernels of the attention ops (the op table: dynenc/ops/registry.py).
TORCH_LIBRARY_FRAGMENT(dynenc, m) {
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float scale)"
        " -> (Tensor, Tensor)");
  m.def("varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
        " Tensor logsumexp, Tensor cu_seqlens, SymInt max_seqlen, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynenc, CPU, m) {
  m.impl("varlen_attention", &dynenc::varlen_attention);
  m.impl("varlen_attention_backward", &dynenc::varlen_attention_backward);
}
