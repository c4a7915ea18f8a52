"""icd.nn.ConditionalDecoder and AuxiliaryTask: the fused attention is MultiheadAttention maths."""

from __future__ import annotations

import math

import pytest
import torch
from op_cases import backend_params
from torch import nn

from icd.nn import (
    AuxiliaryTask,
    ClassPrior,
    ConditionalDecoder,
    ConditionalDecoderLayer,
    InstanceSampler,
    regression_targets,
)

N, C, HEADS, K, S = 3, 24, 4, 7, 53


def _inputs(dtype=torch.float64):
    query = torch.randn(N, K, C, dtype=dtype)
    tokens = torch.randn(N, S, C, dtype=dtype)
    pos = torch.randn(N, S, C, dtype=dtype)
    mask = torch.rand(N, S) < 0.3
    mask[2, :] = False
    mask[2, 40:] = True
    weight = (torch.rand(N, K) < 0.5).to(dtype)
    weight[1] = 0  # an image without real instances
    return query, tokens, pos, mask, weight


def _multihead_like(layer: ConditionalDecoderLayer) -> nn.MultiheadAttention:
    """nn.MultiheadAttention holding the layer's projection weights."""
    weight = layer.q_proj.weight
    mha = nn.MultiheadAttention(
        C, HEADS, batch_first=True, dtype=weight.dtype, device=weight.device
    )
    with torch.no_grad():
        mha.in_proj_weight.copy_(
            torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
        )
        mha.in_proj_bias.copy_(torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))
        mha.out_proj.weight.copy_(layer.out_proj.weight)
        mha.out_proj.bias.copy_(layer.out_proj.bias)
    return mha


def _randomise_biases(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)


def test_projections_are_xavier_with_zero_bias():
    layer = ConditionalDecoderLayer(256, 8)
    bound = math.sqrt(6 / (256 + 256))
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
        assert torch.all(proj.bias == 0)
        assert proj.weight.abs().max() <= bound
        assert proj.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


REFERENCE = pytest.param("reference", torch.device("cpu"), id="reference")


@pytest.mark.parametrize("backend, device", [REFERENCE, *backend_params()])
def test_attention_equals_multihead_attention(backend, device):
    # float64 where the backend has it; the Triton and CUDA kernels compare in float32
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    layer = ConditionalDecoderLayer(C, HEADS, backend=backend).to(device, dtype)
    _randomise_biases(layer)
    mha = _multihead_like(layer)
    query, tokens, pos, mask, weight = (t.to(device) for t in _inputs(dtype))
    key = tokens + layer.pos_proj(pos)
    got = layer.attention(query, key, tokens, mask)
    want, probs = mha(
        query, key, tokens, key_padding_mask=mask, need_weights=True, average_attn_weights=False
    )
    torch.testing.assert_close(got.out, want, **tol)
    assert got.q.shape == (N, HEADS, K, C // HEADS) and got.k.shape == (N, HEADS, S, C // HEADS)
    assert got.lse.shape == (N, HEADS, K)
    # the value mask is the sum over real instances of the textbook attention probabilities
    out = layer(query, tokens, pos, mask, weight)
    torch.testing.assert_close(out.value_mask, torch.einsum("nk,nhks->nhs", weight, probs), **tol)
    assert out.value_mask.grad_fn is None
    # at a mask temperature T: the same probabilities softened, probs ** (1 / T) renormalised
    softened = probs.pow(1 / 3.0)
    softened = (softened / softened.sum(-1, keepdim=True)).nan_to_num()
    hot = layer(query, tokens, pos, mask, weight, mask_temperature=3.0)
    torch.testing.assert_close(hot.value_mask, torch.einsum("nk,nhks->nhs", weight, softened), **tol)
    torch.testing.assert_close(hot.features, out.features)  # the attention itself is unchanged
    # the whole layer: post-norm residual blocks around the same attention
    x1 = layer.norm1(query + want)
    x2 = layer.norm2(x1 + layer.ffn(x1))
    torch.testing.assert_close(out.features, x2, **tol)
    torch.testing.assert_close(
        out.values, layer.v_proj(tokens).view(N, S, HEADS, -1).transpose(1, 2)
    )


@pytest.mark.parametrize("backend, device", [REFERENCE, *backend_params()])
def test_attention_gradients_equal_multihead_attention(backend, device):
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-3)
    layer = ConditionalDecoderLayer(C, HEADS, backend=backend).to(device, dtype)
    _randomise_biases(layer)
    mha = _multihead_like(layer)
    query, tokens, pos, mask, _ = (t.to(device) for t in _inputs(dtype))
    key = tokens + layer.pos_proj(pos).detach()
    grad = torch.randn(N, K, C, dtype=dtype, device=device)
    (layer.attention(query, key, tokens, mask).out * grad).sum().backward()
    (mha(query, key, tokens, key_padding_mask=mask, need_weights=False)[0] * grad).sum().backward()
    in_proj_grad = torch.cat(
        [layer.q_proj.weight.grad, layer.k_proj.weight.grad, layer.v_proj.weight.grad]
    )
    torch.testing.assert_close(in_proj_grad, mha.in_proj_weight.grad, **tol)
    torch.testing.assert_close(layer.out_proj.weight.grad, mha.out_proj.weight.grad, **tol)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_decoder_chains_layers(num_layers):
    decoder = ConditionalDecoder(C, HEADS, num_layers=num_layers, backend="reference").double()
    query, tokens, pos, mask, weight = _inputs()
    outputs = decoder(query, tokens, pos, mask, weight)
    assert len(outputs) == num_layers
    x = query
    for layer, out in zip(decoder.layers, outputs, strict=True):
        step = layer(x, tokens, pos, mask, weight)
        torch.testing.assert_close(out.features, step.features)
        torch.testing.assert_close(out.value_mask, step.value_mask)
        assert out.features.shape == (N, K, C) and out.values.shape == (N, HEADS, S, C // HEADS)
        assert out.value_mask.shape == (N, HEADS, S) and out.value_mask.dtype == torch.float64
        x = out.features
    # each head's mask sums to the number of real instances (over the unmasked keys)
    sums = outputs[-1].value_mask.sum(-1)
    torch.testing.assert_close(
        sums, weight.sum(1, keepdim=True).expand(N, HEADS), atol=1e-9, rtol=0
    )
    assert torch.all(outputs[-1].value_mask[mask[:, None, :].expand(N, HEADS, S)] == 0)
    assert decoder(query, tokens, pos, mask)[0].value_mask is None


def _instances(train: bool):
    sampler = InstanceSampler(ClassPrior.uniform(3), neg_ratio=2, max_labels=10).train(train)
    boxes = [torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 100.0, 80.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    return sampler(boxes, labels, [[80, 100], [60, 60]])


def test_regression_targets_and_losses_by_hand():
    instances = _instances(train=True)
    targets, divisor = regression_targets(instances)
    box, (cx, cy) = instances.boxes[0, 0], instances.centers[0, 0].tolist()
    expected = torch.tensor([(cx - 10) / 100, (cy - 20) / 80, (50 - cx) / 100, (40 - cy) / 80])
    torch.testing.assert_close(targets[0, 0], expected)
    torch.testing.assert_close(divisor[0, 0], torch.tensor([0.4, 0.25, 0.4, 0.25]))
    torch.testing.assert_close(targets[0, 0] + targets[0, 0, [2, 3, 0, 1]], divisor[0, 0])
    assert torch.equal(box, torch.tensor([10.0, 20.0, 50.0, 40.0]))

    aux = AuxiliaryTask(8)
    with torch.no_grad():  # output 0 everywhere: logits 0, sigmoid 0.5
        aux.head.layers[-1].weight.zero_()
        aux.head.layers[-1].bias.zero_()
    losses = aux(torch.randn(2, instances.num_slots, 8), instances)
    assert losses["aux_conf"].item() == pytest.approx(math.log(2), rel=1e-6)
    real = instances.is_real
    manual = ((0.5 - targets).abs() / divisor).sum(-1)[real].mean()
    torch.testing.assert_close(losses["aux_reg"], manual)


def test_aux_losses_without_targets_are_zero_and_connected():
    instances = _instances(train=False)
    instances.is_real[:] = False
    instances.is_valid[:] = False
    aux = AuxiliaryTask(8)
    losses = aux(torch.randn(2, instances.num_slots, 8), instances)
    assert losses["aux_conf"].item() == 0 and losses["aux_reg"].item() == 0
    (losses["aux_conf"] + losses["aux_reg"]).backward()
    assert all(p.grad is not None for p in aux.parameters())
