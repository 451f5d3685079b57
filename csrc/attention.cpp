// Block-diagonal attention over packed sequences: each sequence runs through ATen's CPU
// flash-attention kernels as a [1, H, T, Dh] view of the packed [N, H, Dh] buffers (no copy
// in; their output and logsumexp come back laid out [1, T, H, ...], so copying them into the
// packed results is a contiguous move).
//
// With WavLM's gated relative-position bias (score[i, j, h] = (q_i . k_j) * scale
// + g[i, h] * E[bucket(p_j - p_i), h]) the ATen kernels, which only take a materialised mask,
// are not used: each (sequence, head) runs in blocks of query rows against all its keys, the
// [rows, T] score block (a per-thread buffer of at most kScoreBlock elements, or 16 rows) made
// by a GEMM, the bias added row by row from rel[h][r] = E[buckets[r], h] ([H, 2P - 1], gathered
// once per call), softmax, and a second GEMM. No [H, T, T] (or [T, T]) tensor exists. The
// backward accumulates the table gradient per relative distance, in per-thread [H, 2P - 1]
// partials (fixed groups of work items, so the result does not depend on timing), then sums
// them into the buckets.
#include <ATen/Dispatch.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/exp_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include <torch/library.h>

#include "checks.h"
#include "vectorize.h"

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

// ----------------------------------------------------------------------------- relative-position bias
// The validated bias of one call, in opmath: rel [H, R] with rel[h][r] = table[buckets[r], h]
// (R = 2P - 1 relative distances, r = p_j - p_i + P - 1), gate [N, H] and positions [N]
// contiguous; buckets as given (for the table gradient).
struct Bias {
  at::Tensor rel, gate, positions, buckets;
  int64_t num_positions, num_buckets;
};

// Validates the four bias arguments (all or none) and returns the bias, or nullopt without one.
std::optional<Bias> check_bias(const at::Tensor& q, const std::optional<at::Tensor>& table,
                               const std::optional<at::Tensor>& buckets, const std::optional<at::Tensor>& gate,
                               const std::optional<at::Tensor>& positions, const char* op) {
  const std::pair<const char*, bool> given[] = {{"bias_table", table.has_value()},
                                                {"bias_buckets", buckets.has_value()},
                                                {"bias_gate", gate.has_value()},
                                                {"positions", positions.has_value()}};
  std::string present, missing;
  for (const auto& [name, has] : given) {
    std::string& list = has ? present : missing;
    list += (list.empty() ? "" : ", ") + std::string(name);
  }
  if (present.empty()) return std::nullopt;
  TORCH_CHECK_VALUE(missing.empty(), op,
                    ": the relative-position bias needs all of bias_table, bias_buckets, bias_gate, positions: got ",
                    present, " but ", missing, " missing");
  const int64_t N = q.size(0), H = q.size(1);
  check_rank(*table, 2, op, "bias_table");
  check_like(*table, q, op, "bias_table", "q");
  TORCH_CHECK_VALUE(table->size(1) == H, op, ": bias_table must be [num_buckets, ", H,
                    "] (one column per head), got shape ", table->sizes());
  TORCH_CHECK_TYPE(buckets->scalar_type() == at::kLong, op, ": bias_buckets must be int64, got ",
                   buckets->scalar_type());
  TORCH_CHECK_VALUE(buckets->device() == q.device(), op, ": bias_buckets is on ", buckets->device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(buckets->dim() == 1 && buckets->numel() % 2 == 1, op,
                    ": bias_buckets must be 1-D with 2 * num_positions - 1 (an odd number of) entries, got shape ",
                    buckets->sizes());
  check_matches(*gate, q, {N, H}, op, "bias_gate", "q");
  TORCH_CHECK_TYPE(positions->scalar_type() == at::kLong, op, ": positions must be int64, got ",
                   positions->scalar_type());
  TORCH_CHECK_VALUE(positions->device() == q.device(), op, ": positions is on ", positions->device(),
                    " but q is on ", q.device());
  check_shape(*positions, {N}, op, "positions");
  const int64_t P = (buckets->numel() + 1) / 2, num_buckets = table->size(0);
  const at::Tensor bk = buckets->contiguous(), pos = positions->contiguous();
  // The kernels index rel through the positions and the table through the buckets.
  const int64_t* b = bk.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < bk.numel(); ++r) {
    TORCH_CHECK_VALUE(static_cast<uint64_t>(b[r]) < static_cast<uint64_t>(num_buckets), op, ": bias_buckets[", r,
                      "] = ", b[r], " is out of range, expected values in [0, num_buckets=", num_buckets, ")");
  }
  const int64_t* p = pos.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(static_cast<uint64_t>(p[i]) < static_cast<uint64_t>(P), op, ": positions[", i, "] = ", p[i],
                      " is out of range, expected values in [0, num_positions=", P,
                      ") (bias_buckets has 2 * num_positions - 1 entries)");
  }
  const at::ScalarType opmath = at::toOpMathType(q.scalar_type());
  return Bias{table->to(opmath).index_select(0, bk).t().contiguous(), gate->to(opmath).contiguous(), pos, bk, P,
              num_buckets};
}

// Rows per query block of a biased sequence of `len` keys: the [rows, len] score block stays
// within kScoreBlock elements (L2-resident) with at least 16 rows per GEMM.
constexpr int64_t kScoreBlock = 32768;

int64_t query_block(int64_t len) {
  return std::min<int64_t>(len, std::max<int64_t>(16, kScoreBlock / std::max<int64_t>(1, len) / 8 * 8));
}

// Work items split into at most get_num_threads() fixed groups, largest first onto the least
// loaded group: balanced, and independent of timing (each group accumulates its own partials,
// so results are deterministic for a given thread count).
struct Groups {
  std::vector<std::vector<int64_t>> members;

  explicit Groups(const std::vector<int64_t>& cost) {
    const int64_t n = cost.size();
    members.resize(std::min<int64_t>(at::get_num_threads(), n));
    if (members.empty()) return;
    std::vector<int64_t> order(n), load(members.size(), 0);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
    for (const int64_t i : order) {
      const size_t g = std::min_element(load.begin(), load.end()) - load.begin();
      members[g].push_back(i);
      load[g] += cost[i];
    }
  }

  int64_t size() const { return members.size(); }

  // fn(group, item) for every item, the groups in parallel.
  template <typename F>
  void run(const F& fn) const {
    at::parallel_for(0, size(), 1, [&](int64_t g_begin, int64_t g_end) {
      // As in for_each_sequence: the GEMM / exp calls on views must not record autograd graphs.
      c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
      for (int64_t g = g_begin; g < g_end; ++g) {
        for (const int64_t i : members[g]) fn(g, i);
      }
    });
  }
};

// One (sequence, head) pair, or one query block of it: rows [start + row0, start + row0 + rows)
// against keys [start, start + len).
struct Item {
  int64_t start, len, head, row0, rows;
};

// Row helpers. `rel` points at rel[h] + (P - 1) - p_i for query row i, so rel[p_j] is the bias
// embedding of key j; `pos` is the keys' positions, or nullptr when they are consecutive (no
// frame dropped): then rel is shifted by p_0 and read as a contiguous row, which vectorises.

// s[j] = s[j] * scale + gate * rel[j] - shift; returns the largest value before the shift.
template <typename T>
DYNENC_MULTIVERSION T add_bias(T* s, const T* rel, const int64_t* pos, T gate, T scale, T shift, int64_t n) {
  constexpr int kLanes = 8;
  T lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (pos) {
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const T x = s[j + l] * scale + gate * rel[pos[j + l]];
        lanes[l] = lanes[l] < x ? x : lanes[l];
        s[j + l] = x - shift;
      }
    }
  } else {
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const T x = s[j + l] * scale + gate * rel[j + l];
        lanes[l] = lanes[l] < x ? x : lanes[l];
        s[j + l] = x - shift;
      }
    }
  }
  for (; j < n; ++j) {
    const T x = s[j] * scale + gate * (pos ? rel[pos[j]] : rel[j]);
    lanes[0] = lanes[0] < x ? x : lanes[0];
    s[j] = x - shift;
  }
  T m = lanes[0];
  for (int l = 1; l < kLanes; ++l) m = m < lanes[l] ? lanes[l] : m;
  return m;
}

template <typename T>
DYNENC_MULTIVERSION void subtract(T* s, T c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) s[j] -= c;
}

template <typename T>
DYNENC_MULTIVERSION T row_sum(const T* s, int64_t n) {
  constexpr int kLanes = 8;
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += s[j + l];
  }
  T total = 0;
  for (; j < n; ++j) total += s[j];
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename T>
DYNENC_MULTIVERSION T row_dot(const T* a, const T* b, int64_t n) {
  T total = 0;
  for (int64_t j = 0; j < n; ++j) total += a[j] * b[j];
  return total;
}

template <typename T>
DYNENC_MULTIVERSION void scale_row(T* x, T c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] *= c;
}

// dp[j] <- ds = p[j] * (dp[j] - delta); returns sum_j ds * rel[j] (the gate's gradient).
template <typename T>
DYNENC_MULTIVERSION T score_grads(T* dp, const T* p, const T* rel, const int64_t* pos, T delta, int64_t n) {
  T total = 0;
  if (pos) {
    for (int64_t j = 0; j < n; ++j) {
      const T ds = p[j] * (dp[j] - delta);
      dp[j] = ds;
      total += ds * rel[pos[j]];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const T ds = p[j] * (dp[j] - delta);
      dp[j] = ds;
      total += ds * rel[j];
    }
  }
  return total;
}

// drel[pos[j]] += gate * ds[j] (drel[j] when the positions are consecutive).
template <typename T>
DYNENC_MULTIVERSION void scatter_rel(T* drel, const T* ds, const int64_t* pos, T gate, int64_t n) {
  if (pos) {
    for (int64_t j = 0; j < n; ++j) drel[pos[j]] += gate * ds[j];
  } else {
    for (int64_t j = 0; j < n; ++j) drel[j] += gate * ds[j];
  }
}

// Per sequence (indexed like cu): whether its positions are consecutive.
std::vector<char> consecutive_positions(const std::vector<int32_t>& cu, const int64_t* pos) {
  std::vector<char> out(cu.size() - 1, 1);
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    for (int64_t i = cu[b] + 1; i < cu[b + 1] && out[b]; ++i) out[b] = pos[i] == pos[i - 1] + 1;
  }
  return out;
}

// The bias as the row helpers read it, with each sequence's consecutive-positions flag.
template <typename T>
struct BiasRows {
  const T* rel;
  const T* gate;
  const int64_t* pos;
  int64_t H, R, P;
  std::vector<char> consecutive;

  BiasRows(const Bias& bias, const std::vector<int32_t>& cu, int64_t heads)
      : rel(bias.rel.const_data_ptr<T>()),
        gate(bias.gate.const_data_ptr<T>()),
        pos(bias.positions.const_data_ptr<int64_t>()),
        H(heads),
        R(bias.rel.size(1)),
        P(bias.num_positions),
        consecutive(consecutive_positions(cu, pos)) {}

  // rel row of query row i and head h, shifted so that index p_j (or j, consecutive) reads key j.
  const T* rel_row(int64_t i, int64_t h, int64_t start, bool contiguous) const {
    return rel + h * R + (P - 1) - pos[i] + (contiguous ? pos[start] : 0);
  }
  T g(int64_t i, int64_t h) const { return gate[i * H + h]; }
};

// Forward of the biased attention in opmath T (float or double). q, k, v: T [N, H, Dh] with
// contiguous columns; out: T [N, H, Dh] contiguous; lse: float [N, H].
template <typename T>
void biased_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int32_t>& cu,
                    const Bias& bias, double scale, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t H = q.size(1), Dh = q.size(2);
  const BiasRows<T> rows(bias, cu, H);
  std::vector<Item> items;
  std::vector<int64_t> cost;
  std::vector<char> contiguous;
  int64_t block = 0, max_rows = 0;
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    const int64_t start = cu[b], len = cu[b + 1] - cu[b];
    if (len == 0) continue;
    const int64_t bq = query_block(len);
    block = std::max(block, bq * len);
    max_rows = std::max(max_rows, bq);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t row0 = 0; row0 < len; row0 += bq) {
        items.push_back({start, len, h, row0, std::min(bq, len - row0)});
        cost.push_back(items.back().rows * len * (Dh + 8));
        contiguous.push_back(rows.consecutive[b]);
      }
    }
  }
  const Groups groups(cost);
  // Per group: the score block, then the rows' maxima and 1 / sum.
  const int64_t per_group = block + 2 * max_rows;
  const at::Tensor buffer = at::empty({groups.size(), per_group}, q.options());
  T* buf = buffer.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();
  T* out_p = out.data_ptr<T>();
  const T tscale = static_cast<T>(scale);
  groups.run([&](int64_t g, int64_t it) {
    const Item& item = items[it];
    const int64_t h = item.head, first = item.start + item.row0;
    T* s = buf + g * per_group;
    T* maxima = s + block;
    T* inv = maxima + max_rows;
    at::Tensor scores = at::from_blob(s, {item.rows, item.len}, buffer.options());
    at::cpu::mm_out(scores, q.select(1, h).narrow(0, first, item.rows),
                    k.select(1, h).narrow(0, item.start, item.len).t());
    const int64_t* key_pos = contiguous[it] ? nullptr : rows.pos + item.start;
    for (int64_t r = 0; r < item.rows; ++r) {
      T* srow = s + r * item.len;
      maxima[r] = add_bias(srow, rows.rel_row(first + r, h, item.start, contiguous[it]), key_pos,
                           rows.g(first + r, h), tscale, T(0), item.len);
      subtract(srow, maxima[r], item.len);
    }
    at::cpu::exp_(scores);
    for (int64_t r = 0; r < item.rows; ++r) {
      const T sum = row_sum(s + r * item.len, item.len);
      inv[r] = T(1) / sum;
      lse_p[(first + r) * H + h] = static_cast<float>(maxima[r] + std::log(sum));
    }
    at::Tensor o = out.select(1, h).narrow(0, first, item.rows);
    at::cpu::mm_out(o, scores, v.select(1, h).narrow(0, item.start, item.len));
    for (int64_t r = 0; r < item.rows; ++r) scale_row(out_p + ((first + r) * H + h) * Dh, inv[r], Dh);
  });
}

// Backward of the biased attention in opmath T: grad_q / grad_k / grad_v (T [N, H, Dh] zeros)
// are accumulated into, grad_gate (T [N, H]) written; returns the gradient of rel, T [H, R]
// (per-group partials summed), which the caller scatters into the table's buckets.
template <typename T>
at::Tensor biased_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& out, const at::Tensor& lse, const std::vector<int32_t>& cu,
                           const Bias& bias, double scale, bool recompute_lse, const at::Tensor& grad_q,
                           const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& grad_gate) {
  const int64_t H = q.size(1), Dh = q.size(2);
  const BiasRows<T> rows(bias, cu, H);
  std::vector<Item> items;
  std::vector<int64_t> cost;
  std::vector<char> contiguous;
  int64_t block = 0, max_rows = 0;
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    const int64_t start = cu[b], len = cu[b + 1] - cu[b];
    if (len == 0) continue;
    block = std::max(block, query_block(len) * len);
    max_rows = std::max(max_rows, query_block(len));
    for (int64_t h = 0; h < H; ++h) {
      items.push_back({start, len, h, 0, len});
      cost.push_back(len * len * (Dh + 8));
      contiguous.push_back(rows.consecutive[b]);
    }
  }
  const Groups groups(cost);
  // Per group: the probability block and the score-gradient block.
  const at::Tensor buffer = at::empty({groups.size(), 2 * block}, q.options());
  at::Tensor grad_rel = at::zeros({groups.size(), H, rows.R}, q.options());
  T* buf = buffer.data_ptr<T>();
  T* grad_rel_p = grad_rel.data_ptr<T>();
  T* grad_gate_p = grad_gate.data_ptr<T>();
  const float* lse_p = lse.const_data_ptr<float>();
  const T* go_p = grad_out.const_data_ptr<T>();
  const T* out_p = out.const_data_ptr<T>();
  const T tscale = static_cast<T>(scale);
  groups.run([&](int64_t g, int64_t it) {
    const Item& item = items[it];
    const int64_t h = item.head, len = item.len, bq = query_block(len);
    T* p = buf + g * 2 * block;
    T* dp = p + block;
    T* drel_head = grad_rel_p + (g * H + h) * rows.R;
    const int64_t* key_pos = contiguous[it] ? nullptr : rows.pos + item.start;
    const at::Tensor keys = k.select(1, h).narrow(0, item.start, len);
    const at::Tensor values = v.select(1, h).narrow(0, item.start, len);
    at::Tensor grad_keys = grad_k.select(1, h).narrow(0, item.start, len);
    at::Tensor grad_values = grad_v.select(1, h).narrow(0, item.start, len);
    for (int64_t row0 = 0; row0 < len; row0 += bq) {
      const int64_t n_rows = std::min(bq, len - row0), first = item.start + row0;
      at::Tensor probs = at::from_blob(p, {n_rows, len}, buffer.options());
      at::Tensor dscores = at::from_blob(dp, {n_rows, len}, buffer.options());
      const at::Tensor queries = q.select(1, h).narrow(0, first, n_rows);
      const at::Tensor grad_rows = grad_out.select(1, h).narrow(0, first, n_rows);
      at::cpu::mm_out(probs, queries, keys.t());
      for (int64_t r = 0; r < n_rows; ++r) {
        T* prow = p + r * len;
        const T* rel = rows.rel_row(first + r, h, item.start, contiguous[it]);
        const T gate = rows.g(first + r, h);
        if (recompute_lse) {  // float64: the stored float32 logsumexp would cost its precision
          const T m = add_bias(prow, rel, key_pos, gate, tscale, T(0), len);
          T sum = 0;
          for (int64_t j = 0; j < len; ++j) sum += std::exp(prow[j] - m);
          subtract(prow, m + std::log(sum), len);
        } else {
          add_bias(prow, rel, key_pos, gate, tscale, static_cast<T>(lse_p[(first + r) * H + h]), len);
        }
      }
      at::cpu::exp_(probs);
      at::cpu::mm_out(dscores, grad_rows, values.t());
      for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t i = first + r;
        const T delta = row_dot(go_p + (i * H + h) * Dh, out_p + (i * H + h) * Dh, Dh);
        const T* rel = rows.rel_row(i, h, item.start, contiguous[it]);
        T* ds = dp + r * len;
        grad_gate_p[i * H + h] = score_grads(ds, p + r * len, rel, key_pos, delta, len);
        // rel row i starts at distance p_0 - p_i (consecutive) or -p_i (indexed by p_j).
        scatter_rel(drel_head + (rel - (rows.rel + h * rows.R)), ds, key_pos, rows.g(i, h), len);
      }
      at::cpu::addmm_(grad_values, probs.t(), grad_rows);
      at::cpu::addmm_(grad_keys, dscores.t(), queries, 1, scale);
      at::Tensor grad_queries = grad_q.select(1, h).narrow(0, first, n_rows);
      at::cpu::addmm_(grad_queries, dscores, keys, 1, scale);
    }
  });
  return grad_rel.sum(0);  // [H, R]
}

// q as the biased kernels read it: opmath, contiguous columns (float / double views as they are).
at::Tensor opmath_columns(const at::Tensor& t) {
  const at::ScalarType opmath = at::toOpMathType(t.scalar_type());
  return t.scalar_type() == opmath ? columns_contiguous(t) : t.to(opmath);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                                                    const std::optional<at::Tensor>& bias_table,
                                                    const std::optional<at::Tensor>& bias_buckets,
                                                    const std::optional<at::Tensor>& bias_gate,
                                                    const std::optional<at::Tensor>& positions) {
  constexpr const char* op = "varlen_attention";
  const std::vector<int32_t> cu = check_qkv(q, k, v, cu_seqlens, max_seqlen, op);
  const std::optional<Bias> bias = check_bias(q, bias_table, bias_buckets, bias_gate, positions, op);
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  if (bias) {
    const at::Tensor qc = opmath_columns(q), kc = opmath_columns(k), vc = opmath_columns(v);
    at::Tensor out = at::empty(q.sizes(), qc.options());
    AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), op, [&] { biased_forward<scalar_t>(qc, kc, vc, cu, *bias, scale, out, lse); });
    return {out.to(q.scalar_type()), lse};
  }
  const at::Tensor qc = columns_contiguous(q), kc = columns_contiguous(k), vc = columns_contiguous(v);
  at::Tensor out = at::empty(q.sizes(), q.options());
  for_each_sequence(cu, q.size(1), q.size(2), [&](int64_t start, int64_t len) {
    auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(
        seq_view(qc, start, len), seq_view(kc, start, len), seq_view(vc, start, len), /*dropout_p=*/0.0,
        /*is_causal=*/false, /*attn_mask=*/{}, scale);
    seq_view(out, start, len).copy_(o);
    seq_view(lse, start, len).copy_(l);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& logsumexp, const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
    const std::optional<at::Tensor>& bias_table, const std::optional<at::Tensor>& bias_buckets,
    const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& positions) {
  constexpr const char* op = "varlen_attention_backward";
  const std::vector<int32_t> cu = check_qkv(q, k, v, cu_seqlens, max_seqlen, op);
  check_matches(grad_out, q, q.sizes(), op, "grad_out", "q");
  check_matches(out, q, q.sizes(), op, "out", "q");
  TORCH_CHECK_TYPE(logsumexp.scalar_type() == at::kFloat, op, ": logsumexp must be float32, got ",
              logsumexp.scalar_type());
  check_shape(logsumexp, {q.size(0), q.size(1)}, op, "logsumexp");
  const std::optional<Bias> bias = check_bias(q, bias_table, bias_buckets, bias_gate, positions, op);
  // The float64 kernel reads a float64 logsumexp; widening the stored float32 one would cost
  // float64 its precision, so that (test-only) dtype recomputes it per sequence instead.
  const bool recompute_lse = q.scalar_type() == at::kDouble;
  const at::Tensor lc = logsumexp.contiguous();
  if (bias) {
    const at::ScalarType opmath = at::toOpMathType(q.scalar_type());
    const at::Tensor qc = opmath_columns(q), kc = opmath_columns(k), vc = opmath_columns(v),
                     go = grad_out.to(opmath).contiguous(), oc = out.to(opmath).contiguous();
    const at::TensorOptions options = qc.options();
    at::Tensor grad_q = at::zeros(q.sizes(), options), grad_k = at::zeros(k.sizes(), options),
               grad_v = at::zeros(v.sizes(), options), grad_gate = at::empty({q.size(0), q.size(1)}, options);
    at::Tensor grad_rel;
    AT_DISPATCH_FLOATING_TYPES(opmath, op, [&] {
      grad_rel = biased_backward<scalar_t>(go, qc, kc, vc, oc, lc, cu, *bias, scale, recompute_lse, grad_q, grad_k,
                                           grad_v, grad_gate);
    });
    // Table row b collects every relative distance whose bucket is b (fp32 / fp64 sums).
    at::Tensor grad_table = at::zeros({bias->num_buckets, q.size(1)}, options).index_add_(0, bias->buckets, grad_rel.t());
    const at::ScalarType dtype = q.scalar_type();
    return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), grad_gate.to(dtype), grad_table.to(dtype)};
  }
  const at::Tensor go = grad_out.contiguous(), qc = columns_contiguous(q), kc = columns_contiguous(k),
                   vc = columns_contiguous(v), oc = out.contiguous();
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
  // Without a bias its two gradients are empty [0, H] tensors.
  return {grad_q, grad_k, grad_v, at::empty({0, q.size(1)}, q.options()), at::empty({0, q.size(1)}, q.options())};
}

}  // namespace dynenc

// Schemas and CPU kernels of the attention ops (the op table: dynenc/ops/registry.py).
TORCH_LIBRARY_FRAGMENT(dynenc, m) {
  // The four optional tensors are WavLM's gated relative-position bias (all or none):
  // bias_table [num_buckets, H], bias_buckets int64 [2P - 1], bias_gate [N, H], positions int64 [N].
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float scale,"
        " Tensor? bias_table=None, Tensor? bias_buckets=None, Tensor? bias_gate=None, Tensor? positions=None)"
        " -> (Tensor, Tensor)");
  // -> (grad_q, grad_k, grad_v, grad_bias_gate [N, H], grad_bias_table [num_buckets, H]); the
  // last two are empty [0, H] without a bias.
  m.def("varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
        " Tensor logsumexp, Tensor cu_seqlens, SymInt max_seqlen, float scale, Tensor? bias_table=None,"
        " Tensor? bias_buckets=None, Tensor? bias_gate=None, Tensor? positions=None)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynenc, CPU, m) {
  m.impl("varlen_attention", &dynenc::varlen_attention);
  m.impl("varlen_attention_backward", &dynenc::varlen_attention_backward);
}
