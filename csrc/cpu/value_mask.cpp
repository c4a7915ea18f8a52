// CPU kernel of icd_ext::value_mask (docs/method.md 3.2):
//   out[n, h, s] = sum_k weight[n, k] * softmax_s(scale q k^T / temperature)[k, s].
//
// Only the slots with weight != 0 matter (in ICD the real instances, ~1/6 of K), so their
// query rows are gathered first. Pass 1 finds each row's logsumexp with an online max/sum
// over key tiles; it is skipped when lse is given (temperature 1). Pass 2 recomputes each
// [rows, tile] block of logits and reduces it with the weights: out_tile = w^T exp(l - lse).
// Tiles hold unmasked keys only (cpu/common.h, KeyTiles): masked keys are never read and get
// exactly 0. A thread holds one tile at a time, never the [N, h, K, S] tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/common.h"

namespace icd_cpu {
namespace {

// Per image, the slots k with weight[n, k] != 0 (int64 indices): a slot of weight 0 adds
// nothing, whatever its query holds; a NaN weight is kept, so it reaches the output.
std::vector<Tensor> weighted_slots(const Tensor& weight) {
  std::vector<Tensor> slots;
  for (int64_t n = 0; n < weight.size(0); ++n) slots.push_back(at::nonzero(weight[n] != 0).view(-1));
  return slots;
}

struct PassScratch {
  Tensor logits;    // [rows * block]
  Tensor k_buf;     // [block * D]
  Tensor tile_out;  // [block]: the tile's share of out
};

// The query rows `slots` of image n, head h, times scale / temperature, in the compute dtype.
Tensor scaled_rows(const Tensor& q, int64_t n, int64_t head, const Tensor& slots,
                   at::ScalarType dtype, double factor) {
  return q[n][head].index_select(0, slots).to(dtype).mul(factor);
}

template <typename acc_t>
void value_mask_kernel(const Tensor& q, const Tensor& k, const Tensor& weight,
                       const c10::optional<Tensor>& mask, const c10::optional<Tensor>& lse_in,
                       double factor, Tensor& out) {
  const int64_t n_img = q.size(0), heads = q.size(1), n_slots = q.size(2);
  const int64_t s = k.size(2), d = q.size(3);
  const at::ScalarType stat = c10::CppTypeToScalarType<acc_t>::value;
  const auto opts = at::TensorOptions().dtype(stat);
  const std::vector<Tensor> slots = weighted_slots(weight);
  int64_t max_rows = 1;
  for (const Tensor& rows : slots) max_rows = std::max(max_rows, rows.numel());
  const KeyTiles tiles(mask, n_img, s, key_block_for(max_rows));
  auto make_scratch = [&] {
    const int64_t b = tiles.block();
    return PassScratch{at::empty({max_rows * b}, opts), at::empty({b * d}, opts),
                       at::empty({b}, opts)};
  };

  // Pass 1: the logsumexp of every weighted row, one (image, head) per item.
  Tensor row_lse;
  if (lse_in.has_value()) {
    row_lse = lse_in->detach();
  } else {
    row_lse = at::full({n_img, heads, n_slots}, -std::numeric_limits<double>::infinity(), opts);
    for_each_item(n_img * heads, make_scratch, [&](int64_t item, PassScratch& sc) {
      const int64_t n = item / heads, head = item % heads, rows = slots[n].numel();
      if (rows == 0) return;
      const Tensor qs = scaled_rows(q, n, head, slots[n], stat, factor);
      const Tensor k_head = k[n][head];
      std::vector<acc_t> run_max(rows, -std::numeric_limits<acc_t>::infinity());
      std::vector<acc_t> total(rows, acc_t(0)), rescale(rows);
      for (int64_t t = 0; t < tiles.count(n); ++t) {
        const int64_t len = tiles.length(n, t);
        Tensor logits = scratch_view(sc.logits, rows, len);
        at::mm_out(logits, qs, key_tile(k_head, tiles.keys(n, t), len, sc.k_buf).t());
        online_softmax_tile<acc_t>(logits.data_ptr<acc_t>(), rows, len, run_max.data(),
                                   total.data(), rescale.data());
      }
      Tensor lse_rows = at::empty({rows}, opts);
      acc_t* lse_data = lse_rows.data_ptr<acc_t>();
      for (int64_t r = 0; r < rows; ++r) lse_data[r] = row_logsumexp(run_max[r], total[r]);
      row_lse[n][head].index_copy_(0, slots[n], lse_rows);
    });
  }

  // Pass 2: out tile = w^T exp(logits - lse), one (image, head, run of key tiles) per item.
  // Masked keys are in no tile and keep their 0.
  const int64_t pieces = pieces_per_group(n_img * heads, std::max<int64_t>(1, tiles.max_count()));
  const int64_t tiles_per_piece = (tiles.max_count() + pieces - 1) / pieces;
  for_each_item(n_img * heads * pieces, make_scratch, [&](int64_t item, PassScratch& sc) {
    const int64_t nh = item / pieces, n = nh / heads, head = nh % heads;
    const int64_t rows = slots[n].numel();
    const int64_t t_begin = (item % pieces) * tiles_per_piece;
    const int64_t t_end = std::min(tiles.count(n), t_begin + tiles_per_piece);
    if (rows == 0 || t_begin >= t_end) return;
    const Tensor qs = scaled_rows(q, n, head, slots[n], stat, factor);
    const Tensor w = weight[n].index_select(0, slots[n]).contiguous();
    const Tensor shift = row_lse[n][head].index_select(0, slots[n]).contiguous();
    const acc_t* w_data = w.data_ptr<acc_t>();
    acc_t* shift_data = shift.data_ptr<acc_t>();
    for (int64_t r = 0; r < rows; ++r) shift_data[r] = probability_shift(shift_data[r]);
    const Tensor k_head = k[n][head];
    acc_t* out_head = out[n][head].data_ptr<acc_t>();
    acc_t* tile_out = sc.tile_out.data_ptr<acc_t>();
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t* keys = tiles.keys(n, t);
      const int64_t len = tiles.length(n, t);
      Tensor logits = scratch_view(sc.logits, rows, len);
      at::mm_out(logits, qs, key_tile(k_head, keys, len, sc.k_buf).t());
      const acc_t* x = logits.data_ptr<acc_t>();
      std::fill(tile_out, tile_out + len, acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        add_weighted_probs(tile_out, x + r * len, shift_data[r], w_data[r], len);
      }
      for (int64_t i = 0; i < len; ++i) out_head[keys[i]] = tile_out[i];
    }
  });
}

Tensor value_mask_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& weight_in,
                      const c10::optional<Tensor>& key_padding_mask,
                      const c10::optional<Tensor>& lse, double scale, double temperature) {
  const char* op = "value_mask";
  check_rank(q_in, 4, op, "q", "N, h, K, D");
  check_rank(k_in, 4, op, "k", "N, h, S, D");
  check_input_dtype(q_in, op, "q");
  check_same_dtype(k_in, q_in, op, "k", "q");
  const int64_t n = q_in.size(0), h = q_in.size(1), kq = q_in.size(2), s = k_in.size(2);
  check_shape(k_in, {n, h, s, q_in.size(3)}, op, "k", "N, h, S, D");
  const at::ScalarType stat = compute_type(q_in.scalar_type());
  check_rank(weight_in, 2, op, "weight", "N, K");
  check_shape(weight_in, {n, kq}, op, "weight", "N, K");
  check_stat_tensor(weight_in, stat, op, "weight");
  check_optional_mask(key_padding_mask, n, s, op);
  TORCH_CHECK(temperature > 0, op, ": `temperature` = ", text_of(temperature), "; expected a number > 0");
  if (lse.has_value()) {
    check_rank(*lse, 3, op, "lse", "N, h, K");
    check_shape(*lse, {n, h, kq}, op, "lse", "N, h, K");
    check_stat_tensor(*lse, stat, op, "lse");
    TORCH_CHECK(temperature == 1.0, op, ": `lse` was given with temperature = ", text_of(temperature),
                "; lse is only valid with temperature == 1");
  }

  Tensor out = at::zeros({n, h, s}, q_in.options().dtype(stat));
  if (q_in.numel() == 0 || out.numel() == 0) return out;
  const Tensor q = q_in.detach(), k = k_in.detach(), weight = weight_in.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES(stat, "value_mask", [&] {
    value_mask_kernel<scalar_t>(q, k, weight, key_padding_mask, lse, scale / temperature, out);
  });
  return out;
}

}  // namespace
}  // namespace icd_cpu

TORCH_LIBRARY_IMPL(icd_ext, CPU, m) { m.impl("value_mask", &icd_cpu::value_mask_cpu); }
