"""Conditional decoder: instance queries attend over the teacher's tokens (docs/method.md 4.2).

One layer, for queries [N, K, C], teacher tokens [N, S, C] and their position embedding:
  keys   = k_proj(tokens + pos_proj(pos)), values = v_proj(tokens), q = q_proj(queries)
  attn   = out_proj(instance_attention(q, keys, values, key_padding_mask))   (h heads)
  x1     = LayerNorm(queries + attn)
  x2     = LayerNorm(x1 + Linear(4C, C)(ReLU(Linear(C, 4C)(x1))))
The projections q, k, v and out follow nn.MultiheadAttention (xavier-uniform weights, zero
biases). Attention goes through icd.ops.instance_attention, so the [N, h, K, S] logits never
exist; each layer exposes what the value mask needs (q, k, lse) and the mask itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

import icd.ops as ops


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[N, L, C] -> [N, h, L, D] (a view, D = C / h)."""
    n, length, c = x.shape
    return x.view(n, length, heads, c // heads).permute(0, 2, 1, 3)


def merge_heads(x: Tensor) -> Tensor:
    """[N, h, L, D] -> [N, L, h * D]."""
    n, h, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, h * d)


@dataclass
class AttentionResult:
    """One multi-head attention: its output and the projected inputs.

    out [N, K, C] (after out_proj); q [N, h, K, D]; k, v [N, h, S, D]; lse [N, h, K] fp32.
    """

    out: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    lse: Tensor


@dataclass
class DecoderLayerOutput:
    """What one decoder layer exposes (never the [N, h, K, S] logits).

    features: x2 [N, K, C], the updated instance queries.
    values: v_t [N, h, S, D], the projected teacher values.
    queries, keys, lse: q [N, h, K, D], k [N, h, S, D], lse [N, h, K] fp32 of the attention.
    value_mask: [N, h, S] fp32 = instance_value_mask(q, k, instance_weight, temperature=the
        layer's mask_temperature), or None when no instance_weight was given. No grad_fn.
    """

    features: Tensor
    values: Tensor
    queries: Tensor
    keys: Tensor
    lse: Tensor
    value_mask: Tensor | None


def attention_value_mask(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None,
    lse: Tensor,
    temperature: float,
    backend: str | None,
) -> Tensor:
    """``icd.ops.instance_value_mask`` [N, h, S] of an attention (q, k, its lse) at
    ``temperature``, reusing the lse where it is valid (temperature 1)."""
    return ops.instance_value_mask(
        q,
        k,
        weight,
        key_padding_mask,
        temperature=temperature,
        lse=lse if temperature == 1.0 else None,
        backend=backend,
    )


class ConditionalDecoderLayer(nn.Module):
    """One cross-attention + feed-forward layer; see the module docstring.

    Args:
        channels: C. heads: h (C % h == 0). backend: icd.ops backend of every op call.
    """

    def __init__(self, channels: int, heads: int, backend: str | None = None) -> None:
        super().__init__()
        if channels % heads != 0:
            raise ValueError(
                f"ConditionalDecoderLayer: channels = {channels}; "
                f"expected a multiple of heads = {heads}"
            )
        self.heads = heads
        self.backend = backend
        self.pos_proj = nn.Linear(channels, channels)
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.ReLU(), nn.Linear(4 * channels, channels)
        )
        self.norm2 = nn.LayerNorm(channels)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def attention(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None
    ) -> AttentionResult:
        """Multi-head attention like nn.MultiheadAttention(query, key, value), via icd.ops.

        query [N, K, C]; key, value [N, S, C]; key_padding_mask bool [N, S] (True = ignore).
        """
        q = split_heads(self.q_proj(query), self.heads)
        k = split_heads(self.k_proj(key), self.heads).to(q.dtype)
        v = split_heads(self.v_proj(value), self.heads).to(q.dtype)
        out, lse = ops.instance_attention(q, k, v, key_padding_mask, backend=self.backend)
        return AttentionResult(self.out_proj(merge_heads(out)), q, k, v, lse)

    def forward(
        self,
        query: Tensor,
        tokens: Tensor,
        pos: Tensor,
        key_padding_mask: Tensor | None = None,
        instance_weight: Tensor | None = None,
        mask_temperature: float = 1.0,
    ) -> DecoderLayerOutput:
        """query [N, K, C]; tokens, pos [N, S, C]; key_padding_mask bool [N, S];
        instance_weight [N, K] (1 = real instance) for the value mask, whose softmax is taken
        at ``mask_temperature`` (1: the attention's own, reusing its lse)."""
        key = tokens + self.pos_proj(pos.to(tokens.dtype))
        att = self.attention(query, key, tokens, key_padding_mask)
        x1 = self.norm1(query + att.out)
        x2 = self.norm2(x1 + self.ffn(x1))
        value_mask = None
        if instance_weight is not None:
            value_mask = attention_value_mask(
                att.q, att.k, instance_weight.float(), key_padding_mask, att.lse, mask_temperature, self.backend
            )
        return DecoderLayerOutput(x2, att.v, att.q, att.k, att.lse, value_mask)


class ConditionalDecoder(nn.Module):
    """``num_layers`` ConditionalDecoderLayers; each layer's queries are the previous x2.

    Args:
        channels: C. heads: h. num_layers: decoder depth (1 by default, as in the paper).
        backend: icd.ops backend passed to every op call.
    """

    def __init__(
        self, channels: int, heads: int = 8, num_layers: int = 1, backend: str | None = None
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ConditionalDecoder: num_layers = {num_layers}; expected >= 1")
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(channels, heads, backend) for _ in range(num_layers)
        )

    def forward(
        self,
        queries: Tensor,
        tokens: Tensor,
        pos: Tensor,
        key_padding_mask: Tensor | None = None,
        instance_weight: Tensor | None = None,
        mask_temperature: float = 1.0,
    ) -> list[DecoderLayerOutput]:
        """queries [N, K, C]; tokens, pos [N, S, C]; key_padding_mask bool [N, S];
        instance_weight [N, K]; mask_temperature of the value masks. Returns one
        DecoderLayerOutput per layer."""
        outputs = []
        x = queries
        for layer in self.layers:
            result = layer(x, tokens, pos, key_padding_mask, instance_weight, mask_temperature)
            outputs.append(result)
            x = result.features
        return outputs
