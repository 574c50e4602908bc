"""The MLP of the heads (linear layers with ReLU in between) and the transformer layers' FFN."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "post_norm_ffn"]


class MLP(nn.Module):
    """``num_layers`` linear layers, ReLU after all but the last."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., input_dim)`` -> ``(..., output_dim)``."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def post_norm_ffn(
    x: torch.Tensor,
    linear1: nn.Linear,
    linear2: nn.Linear,
    activation: nn.Module,
    norm: nn.LayerNorm,
    dropout: float,
) -> torch.Tensor:
    """``norm(x + linear2(activation(linear1(x))))`` with dropout after the activation and on
    the residual branch: the FFN of every DETR-style transformer layer (the layers own the
    modules, so that their names are the official checkpoints')."""
    ffn = linear2(F.dropout(activation(linear1(x)), dropout))
    return norm(x + F.dropout(ffn, dropout))
