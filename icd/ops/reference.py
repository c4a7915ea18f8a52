"""Plain-PyTorch definitions of the icd ops: the oracle every backend is tested against.

This module is written to be read next to docs/method.md section 3. It materialises the
[N, h, K, S] attention logits, so it is slow and memory-hungry at detection sizes; the
fused backends compute the same functions without that tensor. Arguments are assumed to be
validated already (see ``icd.ops``). Computation happens in float32, or float64 for
float64 inputs.

Non-finite values (the rule every backend follows): what is masked is never read. Masked
keys (key_padding_mask True), slots of weight 0 in the value mask and locations of weight 0
in the feature MSE may hold NaN or inf and change no output and no gradient; outputs at
masked keys (value mask, dk, dv) and the student gradient at weight-0 locations are exactly
0. Here this is done by zeroing those rows before they meet a 0 factor (0 * NaN = NaN). A
NaN anywhere else gives NaN in every output it reaches.
"""

from __future__ import annotations

import torch
from torch import Tensor

LN_FLOOR = 1e-6  # the floor of the weight sums in masked_feature_mse


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def without_masked_keys(x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """x [N, h, S, D] with the rows of masked keys set to 0 (their values reach nothing)."""
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask[:, None, :, None], 0)


def attention_logits(
    q: Tensor, k: Tensor, key_padding_mask: Tensor | None, scale: float, temperature: float = 1.0
) -> Tensor:
    """scale * q k^T / temperature with masked keys at -inf.

    q [N, h, K, D], k [N, h, S, D], key_padding_mask bool [N, S] -> [N, h, K, S].
    """
    dtype = compute_dtype(q, k)
    k = without_masked_keys(k.to(dtype), key_padding_mask)
    logits = torch.matmul(q.to(dtype), k.transpose(-1, -2)) * (scale / temperature)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return logits


def safe_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim and its logsumexp, defined for rows that are all -inf.

    Such rows get probabilities 0 and lse -inf; no NaN appears in values or gradients. A row
    with a NaN logit gets NaN probabilities and a NaN lse.
    """
    row_max = logits.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalised = torch.exp(logits - row_max)
    total = unnormalised.sum(dim=-1, keepdim=True)
    no_keys = total == 0  # not "total > 0": a NaN total must stay NaN
    safe_total = torch.where(no_keys, torch.ones_like(total), total)
    probs = unnormalised / safe_total
    lse = torch.where(no_keys, torch.full_like(total, float("-inf")), row_max + torch.log(safe_total))
    return probs, lse.squeeze(-1)


def instance_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """out [N, h, K, D] (q's dtype) = softmax(scale q k^T) v; lse [N, h, K] (fp32 or fp64)."""
    probs, lse = safe_softmax(attention_logits(q, k, key_padding_mask, scale))
    out = torch.matmul(probs, without_masked_keys(v.to(probs.dtype), key_padding_mask))
    return out.to(q.dtype), lse  # lse stays in the compute dtype


def instance_value_mask(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None,
    scale: float,
    temperature: float = 1.0,
    lse: Tensor | None = None,
) -> Tensor:
    """out[n, h, s] = sum_k weight[n, k] * softmax_s(logits[n, h, k, :] / temperature)[s].

    q [N, h, K, D], k [N, h, S, D], weight [N, K] -> [N, h, S] float32 (float64 for float64
    inputs). With ``lse`` (temperature 1 only) the probabilities are exp(logits - lse). Slots
    of weight 0 add nothing and masked keys get 0, whatever q, k or lse hold there.
    """
    logits = attention_logits(q, k, key_padding_mask, scale, temperature)
    if lse is None:
        probs, _ = safe_softmax(logits)
    else:
        lse = lse.to(logits.dtype)[..., None]
        has_keys = lse != float("-inf")
        probs = torch.exp(logits - torch.where(has_keys, lse, torch.zeros_like(lse)))
        probs = torch.where(has_keys, probs, torch.zeros_like(probs))
    probs.masked_fill_((weight == 0)[:, None, :, None], 0)  # probs is a fresh tensor
    out = torch.einsum("nk,nhks->nhs", weight.to(probs.dtype), probs)
    if key_padding_mask is not None:
        out = out.masked_fill(key_padding_mask[:, None, :], 0)
    return out


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim without affine parameters (biased variance)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def masked_feature_mse(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    norm: str = "ln",
    eps: float = 1e-5,
    reduction: str = "per_head",
) -> Tensor:
    """Weighted MSE between (normalised) student and teacher features.

    student, teacher [N, h, S, D]; weight [N, h, S] >= 0 -> 0-dim float32 (float64 for
    float64 inputs). Gradient flows to ``student`` only. Locations of weight 0 add nothing
    and get a zero gradient, whatever the features hold there. See docs/method.md 3.3.
    """
    dtype = compute_dtype(student, teacher, weight)
    w = weight.detach().to(dtype)
    hole = (w == 0)[..., None]  # [N, h, S, 1]
    s = student.to(dtype).masked_fill(hole, 0)  # before the LayerNorm, whose backward mixes a row
    t = teacher.detach().to(dtype)
    if norm == "ln":
        s, t = layer_norm(s, eps), layer_norm(t, eps)
    elif norm == "tln":
        t = layer_norm(t, eps)
    err = torch.where(hole, 0, s - t) ** 2  # [N, h, S, D]
    if reduction == "per_head":
        per_head = (err * w[..., None]).sum(dim=2) / w.sum(dim=2).clamp_min(LN_FLOOR)[..., None]
        return per_head.mean()
    return (err.mean(dim=-1) * w).sum() / w.sum().clamp_min(LN_FLOOR)
