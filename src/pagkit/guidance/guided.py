"""The guided denoiser: wraps a model and returns another denoiser, ``eps_c + sum of guidance terms``.

All active branches (conditional, unconditional for CFG, perturbed for PAG) run in one batched model call;
the perturbed rows are declared explicitly to the attention processors. A term whose weight is 0 at a step
adds no rows at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pagkit.attention.processor import RowPlan, patched_attention
from pagkit.batch import concat_trees, first_tensor
from pagkit.guidance.rules import cfg_delta, pag_delta
from pagkit.guidance.schedules import Step
from pagkit.guidance.terms import CFG, PAG
from pagkit.layers import select_layers


class GuidedDenoiser:
    """``denoise(x, t, step) -> eps`` for a diffusers-style model, with CFG and PAG terms combined.

    ``cond`` and ``uncond`` are the model's keyword arguments for the conditional and unconditional branches
    (e.g. ``{"class_labels": y}``); their tensors have the same batch size as ``x``.
    """

    def __init__(
        self,
        model: nn.Module,
        cond: dict[str, Any] | None = None,
        uncond: dict[str, Any] | None = None,
        terms: Sequence[CFG | PAG] = (),
    ) -> None:
        self.model = model
        self.cond = cond or {}
        self.uncond = uncond
        self.cfg = [t for t in terms if isinstance(t, CFG)]
        self.pag = [t for t in terms if isinstance(t, PAG)]
        unknown = [t for t in terms if not isinstance(t, (CFG, PAG))]
        if unknown:
            raise TypeError(f"unsupported guidance term {unknown[0]!r}")
        if len(self.cfg) > 1 or len(self.pag) > 1:
            raise ValueError("give at most one CFG and one PAG term")
        if self.cfg and uncond is None:
            raise ValueError("CFG needs the unconditional inputs (uncond=...)")
        self.layers = select_layers(model, self.pag[0].layers) if self.pag else []
        self.plan = RowPlan()

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, step: Step = Step()) -> torch.Tensor:
        """Guided noise prediction ``[B, C, H, W]`` for ``x: [B, C, H, W]`` at timestep ``t``."""
        b = x.shape[0]
        w_cfg = self.cfg[0].weight(step) if self.cfg else 0.0
        w_pag = self.pag[0].weight(step) if self.pag else 0.0
        conds = [self.cond]
        if w_cfg != 0.0:
            conds.append(self.uncond)
        if w_pag != 0.0:
            conds.append(self.cond)
        k = len(conds)
        rows = None
        if w_pag != 0.0:
            rows = torch.zeros(k * b, dtype=torch.bool, device=x.device)
            rows[-b:] = True
        t_all = torch.cat([t] * k) if isinstance(t, torch.Tensor) and t.ndim > 0 else t
        x_all = torch.cat([x] * k)
        kwargs = concat_trees(conds, b)
        if rows is None:
            out = first_tensor(self.model(x_all, t_all, **kwargs))
        else:
            op = self.pag[0].perturbation
            with patched_attention(self.layers, op, self.plan), self.plan.perturb(rows):
                out = first_tensor(self.model(x_all, t_all, **kwargs))
        chunks = out.split(b)
        eps = chunks[0]
        i = 1
        if w_cfg != 0.0:
            eps = eps + cfg_delta(chunks[0], chunks[i], 1.0 + w_cfg)
            i += 1
        if w_pag != 0.0:
            eps = eps + pag_delta(chunks[0], chunks[i], w_pag)
        return eps
