"""The small multi-layer perceptron used by the instance encoder and the auxiliary head."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last).

    MLP(in, hidden, out, 3) = Linear(in, hidden), ReLU, Linear(hidden, hidden), ReLU,
    Linear(hidden, out). Input [..., in] -> output [..., out].
    """

    def __init__(
        self, in_features: int, hidden_features: int, out_features: int, num_layers: int
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers = {num_layers}; expected >= 1")
        widths = [in_features] + [hidden_features] * (num_layers - 1) + [out_features]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x
