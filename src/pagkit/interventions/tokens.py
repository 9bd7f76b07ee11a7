"""Token Perturbation Guidance's weak branch (Rajabi et al., arXiv 2506.10036): shuffled tokens.

For the rows the engine marks, the hidden states entering each chosen module (a block-level spec, as for SLG:
``blocks.N``, module paths, or attention layers such as ``mid``) have their tokens permuted: ``[B, N, C]``
along ``N``, ``[B, C, H, W]`` over the ``H * W`` positions. The permutation is fixed per layer and token count
(seeded): the same at every step and for every image, so image i depends only on its own seed. Shuffling keeps
the token statistics (norm, mean) and destroys their spatial arrangement, which is what TPG steers away from.
Self-attention is permutation-equivariant, so on an attention layer that adds its own residual the shuffle
equals shuffling its output; the layers after it see the shuffled arrangement.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from pagkit.interventions.base import InstanceForward, Intervention
from pagkit.interventions.blocks import Unit, _first_input, resolve_units
from pagkit.interventions.rows import rows_for


def permutation(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """The fixed permutation of ``n`` tokens for ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)


def shuffle_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x`` with its tokens permuted: ``[B, N, C]`` along N, ``[B, C, H, W]`` over the positions."""
    if x.ndim == 3:
        return x[:, perm]
    if x.ndim == 4:
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w)[:, :, perm].reshape(b, c, h, w)
    raise ValueError(
        f"TPG shuffles tokens of [B, N, C] or [B, C, H, W] hidden states, got shape {tuple(x.shape)}: choose layers "
        "or blocks whose input is a token sequence or a feature map (pagkit layers lists them)"
    )


def _tokens(x: torch.Tensor) -> int:
    return int(x.shape[1]) if x.ndim == 3 else int(x.shape[2] * x.shape[3]) if x.ndim == 4 else 0


class _Shuffled(InstanceForward):
    """An instance ``forward``: the marked rows' first input shuffled, then the original forward on all rows."""

    def __init__(self, module: nn.Module, key: int, name: str, seed: int) -> None:
        super().__init__(module)
        self.module, self.key, self.name, self.seed = module, key, name, seed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first, where = _first_input(args, kwargs)
        if first is None:
            return self.original(*args, **kwargs)
        mask = rows_for(self.key, first.shape[0], f"module {self.name}")
        if mask is None:
            return self.original(*args, **kwargs)
        mask = mask.to(first.device)
        perm = permutation(_tokens(first), self.seed + _tokens(first), first.device)
        shuffled = first.clone()
        shuffled[mask] = shuffle_tokens(first[mask], perm)
        if where == 0:
            args = (shuffled, *args[1:])
        else:
            kwargs = {**kwargs, str(where): shuffled}
        return self.original(*args, **kwargs)


class TokenShuffle(Intervention):
    """Shuffle the tokens entering ``layers`` (a block-level spec) for the marked rows."""

    def __init__(self, layers: str | list[str] | tuple[str, ...], seed: int = 0) -> None:
        self.layers = layers
        self.seed = seed

    def __repr__(self) -> str:
        return f"TokenShuffle(layers={self.layers!r}, seed={self.seed})"

    def resolve(self, model: nn.Module) -> list[Unit]:
        return resolve_units(model, self.layers)

    def targets(self, model: nn.Module) -> list[nn.Module]:
        return [u.module for u in self.resolve(model)]

    def install(self, model: nn.Module, key: int) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        try:
            for i, unit in enumerate(self.resolve(model)):
                wrapper = _Shuffled(unit.module, key, unit.name, self.seed * 1_000_003 + i * 7_919)
                wrapper.install()
                stack.callback(wrapper.remove)
        except BaseException:
            stack.close()
            raise
        return stack
