// CPU kernels of the dynenc:: ops. Shapes and semantics: dynenc/reference.py.
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace dynenc {

// out = x; out[index] = x[index] + gate * (y - x[index]); index/gate optional (prefix / gate 1).
at::Tensor gated_residual_scatter(const at::Tensor& x, const at::Tensor& y,
                                  const std::optional<at::Tensor>& gate,
                                  const std::optional<at::Tensor>& index);
// -> (grad_x [N,D], grad_y [M,D], grad_gate [M]; zeros when gate is None)
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_residual_scatter_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& index);

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index);
at::Tensor scatter_rows(const at::Tensor& y, const at::Tensor& index, int64_t num_rows);

at::Tensor varlen_dwconv1d(const at::Tensor& x, const at::Tensor& cu_seqlens,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// -> (grad_x [N,C], grad_weight [C,K], grad_bias [C])
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_dwconv1d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& cu_seqlens,
    const at::Tensor& weight);

// -> (out [N,H,Dh], logsumexp [N,H] float32)
std::tuple<at::Tensor, at::Tensor> varlen_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                    int64_t max_seqlen, double scale);
// -> (grad_q, grad_k, grad_v)
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& logsumexp, const at::Tensor& cu_seqlens,
    int64_t max_seqlen, double scale);

// -> (indices int64 [S], offsets int64 [L+1], active_cu_seqlens int32 [L,B+1])
std::tuple<at::Tensor, at::Tensor, at::Tensor> build_plan(const at::Tensor& row_mask,
                                                          const at::Tensor& cu_seqlens);

}  // namespace dynenc
