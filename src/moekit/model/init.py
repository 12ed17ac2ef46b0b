"""Weight initialisation shared by the model's modules: each module's children in the order its
`__init__` assigns them, which is the order of the random draws (a seeded model's weights)."""

from __future__ import annotations

from torch import nn


def init_children(
    module: nn.Module, std: float, out_std: float, out_proj: nn.Linear | None = None
) -> None:
    """Initialise `module`'s children in their order (the order of the random draws): nn.Linear
    weights Normal(0, std), out_proj's Normal(0, out_std), biases zero; RMSNorms to one; any
    other child by its own `init_weights(std, out_std)`."""
    for child in module.children():
        if isinstance(child, nn.Linear):
            nn.init.normal_(child.weight, std=out_std if child is out_proj else std)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.RMSNorm):
            child.reset_parameters()
        else:
            child.init_weights(std, out_std)
