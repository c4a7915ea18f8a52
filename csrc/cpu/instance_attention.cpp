// CPU kernels of icd_ext::attention_forward and icd_ext::attention_backward (docs/method.md 3.1).
//
// Flash-attention style: per (image, head) the unmasked keys are visited in tiles; a thread
// holds one or two [rows, tile] blocks of logits at a time, never the [N, h, K, S] tensor.
// The forward keeps an online softmax (running max and sum per query row) and saves nothing
// but out and lse; the backward recomputes the probabilities of each tile from lse:
//   P = exp(scale q k^T - lse),  dP = dO v^T,  dS = P * (dP - delta),
//   delta = rowsum(dO * out) - grad_lse   (the grad_lse term makes lse differentiable),
//   dv = P^T dO,  dk = scale dS^T q,  dq = scale dS k.
// GEMMs are ATen calls (MKL), single-threaded inside at::parallel_for, one work item
// (image, head, piece) per thread at a time; the element-wise passes are the fused row
// kernels of softmax_rows.cpp. dq, dk and dv have the strides of q, k and v.
//
// Non-finite inputs: masked keys are never read (KeyTiles). A NaN logit is skipped by the row
// max but kept by the row sum, so the row's out and lse are NaN and so are the probabilities
// the backward recomputes from that lse.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/common.h"

namespace icd_cpu {
namespace {

// A forward item covers at least this many query rows (when K allows).
constexpr int64_t kMinRowsPerPiece = 16;

struct Dims {
  int64_t n, h, k, s, d;
};

Dims check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                            const c10::optional<Tensor>& mask, const char* op) {
  check_rank(q, 4, op, "q", "N, h, K, D");
  check_rank(k, 4, op, "k", "N, h, S, D");
  check_rank(v, 4, op, "v", "N, h, S, D");
  check_input_dtype(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  const Dims dims{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  check_shape(k, {dims.n, dims.h, dims.s, dims.d}, op, "k", "N, h, S, D");
  check_shape(v, k.sizes(), op, "v", "N, h, S, D");
  check_optional_mask(mask, dims.n, dims.s, op);
  return dims;
}

// Per-thread buffers of the forward pass.
struct ForwardScratch {
  Tensor logits;        // [rows * block]
  Tensor acc;           // [rows * D]
  Tensor k_buf, v_buf;  // [block * D]
  Tensor rescale;       // [rows]
};

template <typename acc_t>
void forward_kernel(const Tensor& q, const Tensor& k, const Tensor& v,
                    const c10::optional<Tensor>& mask, double scale, const Dims& dim,
                    Tensor& out, Tensor& lse) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t max_pieces = std::max<int64_t>(1, dim.k / kMinRowsPerPiece);
  int64_t pieces = pieces_per_group(dim.n * dim.h, max_pieces);
  const int64_t rows_per_piece = (dim.k + pieces - 1) / pieces;
  pieces = (dim.k + rows_per_piece - 1) / rows_per_piece;
  const KeyTiles tiles(mask, dim.n, dim.s, key_block_for(rows_per_piece));

  auto make_scratch = [&] {
    const int64_t r = rows_per_piece, b = tiles.block();
    return ForwardScratch{at::empty({r * b}, opts), at::empty({r * dim.d}, opts),
                          at::empty({b * dim.d}, opts), at::empty({b * dim.d}, opts),
                          at::empty({r}, opts)};
  };

  for_each_item(dim.n * dim.h * pieces, make_scratch, [&](int64_t item, ForwardScratch& sc) {
    const int64_t nh = item / pieces, n = nh / dim.h, head = nh % dim.h;
    const int64_t row0 = (item % pieces) * rows_per_piece;
    const int64_t rows = std::min(rows_per_piece, dim.k - row0);
    const Tensor qs = q[n][head].narrow(0, row0, rows).to(opts.dtype()).mul(scale);
    const Tensor k_head = k[n][head], v_head = v[n][head];
    Tensor acc = scratch_view(sc.acc, rows, dim.d).zero_();
    Tensor rescale = sc.rescale.narrow(0, 0, rows);
    std::vector<acc_t> run_max(rows, -std::numeric_limits<acc_t>::infinity());
    std::vector<acc_t> total(rows, acc_t(0));

    for (int64_t t = 0; t < tiles.count(n); ++t) {
      const int64_t* keys = tiles.keys(n, t);
      const int64_t len = tiles.length(n, t);
      const Tensor kt = key_tile(k_head, keys, len, sc.k_buf);
      const Tensor vt = key_tile(v_head, keys, len, sc.v_buf);
      Tensor logits = scratch_view(sc.logits, rows, len);
      at::mm_out(logits, qs, kt.t());
      online_softmax_tile<acc_t>(logits.data_ptr<acc_t>(), rows, len, run_max.data(),
                                 total.data(), rescale.data_ptr<acc_t>());
      acc.mul_(rescale.unsqueeze(1)).addmm_(logits, vt);
    }

    acc_t* inv = rescale.data_ptr<acc_t>();
    acc_t* lse_row = lse[n][head].narrow(0, row0, rows).data_ptr<acc_t>();
    for (int64_t r = 0; r < rows; ++r) {
      inv[r] = row_inverse_sum(total[r]);
      lse_row[r] = row_logsumexp(run_max[r], total[r]);
    }
    out[n][head].narrow(0, row0, rows).copy_(acc.mul_(rescale.unsqueeze(1)));
  });
}

std::tuple<Tensor, Tensor> attention_forward_cpu(const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in,
                                                 const c10::optional<Tensor>& key_padding_mask,
                                                 double scale) {
  const Dims dim =
      check_attention_inputs(q_in, k_in, v_in, key_padding_mask, "attention_forward");
  const Tensor q = q_in.detach(), k = k_in.detach(), v = v_in.detach();
  const at::ScalarType stat = compute_type(q.scalar_type());
  Tensor out = at::empty({dim.n, dim.h, dim.k, dim.d}, q.options());
  Tensor lse = at::empty({dim.n, dim.h, dim.k}, q.options().dtype(stat));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(stat, "attention_forward", [&] {
    forward_kernel<scalar_t>(q, k, v, key_padding_mask, scale, dim, out, lse);
  });
  return {out, lse};
}

// Per-thread buffers of the backward pass.
struct BackwardScratch {
  Tensor probs, dlogits;  // [K * block]
  Tensor k_buf, v_buf;    // [block * D]
  Tensor grad_rows;       // [block * D], dk or dv rows before they are scattered
};

template <typename acc_t>
void backward_kernel(const Tensor& grad_out, const Tensor& delta, const Tensor& lse_shift,
                     const Tensor& q, const Tensor& k, const Tensor& v, const KeyTiles& tiles,
                     double scale, const Dims& dim, Tensor& dq_parts, Tensor& dk, Tensor& dv) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t pieces = dq_parts.size(1);
  const int64_t tiles_per_piece = (tiles.max_count() + pieces - 1) / pieces;
  const bool same_dtype = dk.scalar_type() == opts.dtype().toScalarType();

  auto make_scratch = [&] {
    const int64_t b = tiles.block();
    return BackwardScratch{at::empty({dim.k * b}, opts), at::empty({dim.k * b}, opts),
                           at::empty({b * dim.d}, opts), at::empty({b * dim.d}, opts),
                           at::empty({b * dim.d}, opts)};
  };

  // dk / dv rows of tile keys: written in place (through the output's strides) when they are
  // a slice of the output in the compute dtype, else computed into a buffer and scattered.
  auto write_rows = [&](Tensor& head, const int64_t* keys, int64_t len, Tensor& buffer,
                        const Tensor& a, const Tensor& b) {
    if (same_dtype && head.stride(1) == 1 && consecutive(keys, len)) {
      Tensor rows = head.narrow(0, keys[0], len);
      at::mm_out(rows, a, b);
    } else {
      Tensor rows = scratch_view(buffer, len, dim.d);
      scatter_rows(at::mm_out(rows, a, b), keys, head);
    }
  };

  for_each_item(dim.n * dim.h * pieces, make_scratch, [&](int64_t item, BackwardScratch& sc) {
    const int64_t nh = item / pieces, n = nh / dim.h, head = nh % dim.h;
    const int64_t piece = item % pieces;
    Tensor dk_head = dk[n][head], dv_head = dv[n][head];
    if (piece == 0) {
      zero_rows(tiles.masked(n), dk_head);
      zero_rows(tiles.masked(n), dv_head);
    }
    Tensor dq_acc = dq_parts[nh][piece].zero_();
    const int64_t t_begin = piece * tiles_per_piece;
    const int64_t t_end = std::min(tiles.count(n), t_begin + tiles_per_piece);
    if (t_begin >= t_end) return;
    const Tensor qs = q[n][head].to(opts.dtype()).mul(scale);
    const Tensor d_out = grad_out[n][head];
    const acc_t* row_delta = delta[n][head].data_ptr<acc_t>();
    const acc_t* shift = lse_shift[n][head].data_ptr<acc_t>();
    const Tensor k_head = k[n][head], v_head = v[n][head];

    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t* keys = tiles.keys(n, t);
      const int64_t len = tiles.length(n, t);
      const Tensor kt = key_tile(k_head, keys, len, sc.k_buf);
      const Tensor vt = key_tile(v_head, keys, len, sc.v_buf);
      Tensor probs = scratch_view(sc.probs, dim.k, len);
      Tensor dlogits = scratch_view(sc.dlogits, dim.k, len);
      at::mm_out(probs, qs, kt.t());
      at::mm_out(dlogits, d_out, vt.t());
      acc_t* p = probs.data_ptr<acc_t>();
      acc_t* ds = dlogits.data_ptr<acc_t>();
      for (int64_t r = 0; r < dim.k; ++r) {
        probs_and_dlogits(p + r * len, shift[r], ds + r * len, row_delta[r], len);
      }
      write_rows(dv_head, keys, len, sc.grad_rows, probs.t(), d_out);
      write_rows(dk_head, keys, len, sc.grad_rows, dlogits.t(), qs);  // qs carries the scale
      dq_acc.addmm_(dlogits, kt);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_out_in, const c10::optional<Tensor>& grad_lse_in, const Tensor& q_in,
    const Tensor& k_in, const Tensor& v_in, const c10::optional<Tensor>& key_padding_mask,
    const Tensor& out_in, const Tensor& lse_in, double scale) {
  const char* op = "attention_backward";
  const Dims dim = check_attention_inputs(q_in, k_in, v_in, key_padding_mask, op);
  const at::ScalarType stat = compute_type(q_in.scalar_type());
  check_rank(grad_out_in, 4, op, "grad_out", "N, h, K, D");
  check_input_dtype(grad_out_in, op, "grad_out");
  check_shape(grad_out_in, q_in.sizes(), op, "grad_out", "N, h, K, D");
  check_rank(out_in, 4, op, "out", "N, h, K, D");
  check_input_dtype(out_in, op, "out");
  check_shape(out_in, q_in.sizes(), op, "out", "N, h, K, D");
  check_rank(lse_in, 3, op, "lse", "N, h, K");
  check_stat_tensor(lse_in, stat, op, "lse");
  check_shape(lse_in, {dim.n, dim.h, dim.k}, op, "lse", "N, h, K");
  if (grad_lse_in.has_value()) {
    check_rank(*grad_lse_in, 3, op, "grad_lse", "N, h, K");
    check_input_dtype(*grad_lse_in, op, "grad_lse");
    check_shape(*grad_lse_in, {dim.n, dim.h, dim.k}, op, "grad_lse", "N, h, K");
  }

  // Gradients have the strides of their inputs (at::empty_like keeps those of a dense,
  // non-overlapping tensor), so autograd hands them to permuted views without a copy.
  const Tensor q = q_in.detach(), k = k_in.detach(), v = v_in.detach();
  Tensor dk = at::empty_like(k);
  Tensor dv = at::empty_like(v);
  if (q.numel() == 0) return {at::empty_like(q).zero_(), dk.zero_(), dv.zero_()};

  // Small [N, h, K(, D)] tensors: contiguous in the compute dtype (grads may be expanded).
  const auto stat_opts = at::TensorOptions().dtype(stat);
  const Tensor d_out = grad_out_in.detach().to(stat).contiguous();
  Tensor delta = (d_out * out_in.detach().to(stat)).sum(-1);
  if (grad_lse_in.has_value()) delta.sub_(grad_lse_in->detach().to(stat));
  delta = delta.contiguous();
  const Tensor lse_shift = lse_in.detach().contiguous().clone();

  const KeyTiles tiles(key_padding_mask, dim.n, dim.s, key_block_for(dim.k));
  const int64_t pieces = pieces_per_group(dim.n * dim.h, std::max<int64_t>(1, tiles.max_count()));
  Tensor dq_parts = at::empty({dim.n * dim.h, pieces, dim.k, dim.d}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES(stat, "attention_backward", [&] {
    scalar_t* shift = lse_shift.data_ptr<scalar_t>();
    for (int64_t i = 0; i < lse_shift.numel(); ++i) shift[i] = probability_shift(shift[i]);
    backward_kernel<scalar_t>(d_out, delta, lse_shift, q, k, v, tiles, scale, dim, dq_parts,
                              dk, dv);
  });
  const Tensor dq_sum = (pieces == 1 ? dq_parts.select(1, 0) : dq_parts.sum(1)).mul_(scale);
  Tensor dq = dq_sum.view({dim.n, dim.h, dim.k, dim.d});
  // dq_sum is contiguous in the compute dtype: returned as it is when that is q's layout
  const Tensor layout = at::empty_like(q, q.options().device(at::kMeta));
  if (dq.scalar_type() != q.scalar_type() || dq.strides() != layout.strides()) {
    dq = at::empty_like(q).copy_(dq);
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace icd_cpu

TORCH_LIBRARY_IMPL(icd_ext, CPU, m) {
  m.impl("attention_forward", &icd_cpu::attention_forward_cpu);
  m.impl("attention_backward", &icd_cpu::attention_backward_cpu);
}
