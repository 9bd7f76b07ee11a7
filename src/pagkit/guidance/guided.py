"""The guided denoiser: wraps a model and returns another denoiser, ``eps_c + sum of guidance terms``.

The conditional and (for CFG) unconditional branches run in one batched model call. PAG's perturbed branch
runs on copies of the conditional rows appended to that batch, declared explicitly to the attention
processors; with prefix sharing (the default, see :mod:`pagkit.prefix`) the copies are not computed before the
first perturbed layer (``"batched"``), or run in a second call that replays that prefix (``"replay"``). A term
whose weight is 0 at a step adds no rows at all; with ``reuse_delta = k`` PAG's ``eps_c - eps_perturbed`` is
recomputed every k-th step only.
SAG needs the conditional prediction first, so its branch is a second, sequential call (Hong et al.); during
the first call the attention map of the conditional rows is recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pagkit.attention.processor import RowPlan, patched_attention
from pagkit.batch import concat_trees, first_tensor
from pagkit.guidance.delta import DeltaCache
from pagkit.guidance.rules import cfg_delta
from pagkit.guidance.sag import SAG, CapturedMap, alpha_bar_of, captured_attention, sag_degrade, sag_mask
from pagkit.guidance.schedules import Step
from pagkit.guidance.terms import CFG, PAG
from pagkit.layers import select_layers
from pagkit.prefix import PrefixCache, PrefixDedup, sharing_mode

Term = CFG | PAG | SAG


class GuidedDenoiser:
    """``denoise(x, t, step) -> eps`` for a diffusers-style model, with CFG, PAG and SAG terms combined.

    ``cond`` and ``uncond`` are the model's keyword arguments for the conditional and unconditional branches
    (e.g. ``{"class_labels": y}``); their tensors have the same batch size as ``x``. With ``autocast`` (e.g.
    ``torch.bfloat16``) the model calls run under ``torch.autocast``; their outputs are cast back to the input's
    dtype before the guidance terms are combined, so the deltas are formed in full precision.
    """

    def __init__(
        self,
        model: nn.Module,
        cond: dict[str, Any] | None = None,
        uncond: dict[str, Any] | None = None,
        terms: Sequence[Term] = (),
        prefix_sharing: bool | str = True,
        reuse_delta: int = 1,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.autocast = autocast
        self.cond = cond or {}
        self.uncond = uncond
        self.cfg = [t for t in terms if isinstance(t, CFG)]
        self.pag = [t for t in terms if isinstance(t, PAG)]
        self.sag = [t for t in terms if isinstance(t, SAG)]
        unknown = [t for t in terms if not isinstance(t, (CFG, PAG, SAG))]
        if unknown:
            raise TypeError(f"unsupported guidance term {unknown[0]!r}")
        if len(self.cfg) > 1 or len(self.pag) > 1 or len(self.sag) > 1:
            raise ValueError("give at most one CFG, one PAG and one SAG term")
        if self.cfg and uncond is None:
            raise ValueError("CFG needs the unconditional inputs (uncond=...)")
        self.layers = select_layers(model, self.pag[0].layers) if self.pag else []
        mode = sharing_mode(prefix_sharing)
        modules = [layer.module for layer in self.layers]
        self.prefix = PrefixCache(model, modules) if mode == "replay" else None
        self.dedup = PrefixDedup(model, modules) if mode == "batched" and self.pag else None
        self.deltas = DeltaCache(reuse_delta)
        self.sag_layers = select_layers(model, self.sag[0].layer) if self.sag else []
        joint = [layer.name for layer in self.sag_layers if layer.kind != "self"]
        if joint:
            raise ValueError(f"SAG reads a self-attention map; {joint[0]} is a joint (MMDiT) attention layer")
        self.plan = RowPlan()

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, step: Step = Step()) -> torch.Tensor:
        """Guided noise prediction ``[B, C, H, W]`` for ``x: [B, C, H, W]`` at timestep ``t``."""
        b = x.shape[0]
        w_cfg = self.cfg[0].weight(step) if self.cfg else 0.0
        w_pag = self.pag[0].weight(step) if self.pag else 0.0
        reused = self.deltas.get(step, b) if w_pag != 0.0 else None
        reuse = reused is not None
        separate = self.prefix is not None or reuse  # the perturbed rows are not in the main batch
        conds = [self.cond]
        if w_cfg != 0.0:
            conds.append(self.uncond)
        if w_pag != 0.0 and not separate:
            conds.append(self.cond)
        w_sag = self.sag[0].weight(step) if self.sag else 0.0
        alpha_bar = alpha_bar_of(step) if w_sag != 0.0 else 1.0  # fail before any model call
        k = len(conds)
        rows = None
        if w_pag != 0.0 and not separate:
            rows = torch.zeros(k * b, dtype=torch.bool, device=x.device)
            rows[-b:] = True
        t_all = torch.cat([t] * k) if isinstance(t, torch.Tensor) and t.ndim > 0 else t
        x_all = torch.cat([x] * k)
        kwargs = concat_trees(conds, b)
        eps_p = None
        with contextlib.ExitStack() as pag:
            shared = w_pag != 0.0 and self.prefix is not None and not reuse
            if w_pag != 0.0 and not reuse:
                pag.enter_context(patched_attention(self.layers, self.pag[0].perturbation, self.plan))
            if rows is not None:
                pag.enter_context(self.plan.perturb(rows))
                if self.dedup is not None:  # the appended copies of the conditional rows start at the fork
                    self.dedup.install()
                    pag.callback(self.dedup.remove)
                    pag.enter_context(self.dedup.dedup((k - 1) * b, torch.arange(b, device=x.device)))
            if shared:
                assert self.prefix is not None
                self.prefix.install()
                pag.callback(self.prefix.remove)
                self.prefix.start_recording(k * b, torch.arange(b, device=x.device))
            with contextlib.ExitStack() as sag:
                records = []
                if w_sag != 0.0:  # record the conditional rows' attention maps (outermost wrapper: every row)
                    cond_rows = torch.zeros(k * b, dtype=torch.bool, device=x.device)
                    cond_rows[:b] = True
                    records = sag.enter_context(captured_attention(self.sag_layers, cond_rows))
                out = self._predict(x_all, t_all, kwargs)
            if shared:
                assert self.prefix is not None
                self.prefix.stop_recording()
                # the conditional rows again, perturbed, from the first perturbed layer on
                with self.prefix.replay(), self.plan.perturb(torch.ones(b, dtype=torch.bool, device=x.device)):
                    eps_p = self._predict(x, t, self.cond)
        chunks = out.split(b)
        eps = chunks[0]
        i = 1
        if w_cfg != 0.0:
            eps = eps + cfg_delta(chunks[0], chunks[i], 1.0 + w_cfg)
            i += 1
        if w_pag != 0.0:
            if reused is not None:
                diff = reused
            else:
                diff = chunks[0] - (eps_p if eps_p is not None else chunks[i])
                self.deltas.put(step, diff)
            eps = eps + w_pag * diff  # Ahn et al. Eq. 7/8: s (eps_c - eps_perturbed)
        if w_sag != 0.0:
            eps = eps + w_sag * (chunks[0] - self._sag_branch(x, t, chunks[0], alpha_bar, records))
        return eps

    def _predict(self, x: torch.Tensor, t: torch.Tensor | float, kwargs: dict[str, Any]) -> torch.Tensor:
        """One model call (under autocast when asked); the prediction in ``x``'s dtype."""
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = first_tensor(self.model(x, t, **kwargs))
        return out.to(x.dtype)

    def _sag_branch(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        eps_c: torch.Tensor,
        alpha_bar: float,
        records: list[CapturedMap],
    ) -> torch.Tensor:
        """``eps(x_t')``: the conditional prediction at the SAG-degraded input (Hong et al. Sec. 4)."""
        mask = None
        for record in records:
            if record.probs is None:
                raise RuntimeError("SAG: the chosen attention layer was not called during the model's forward pass")
            m = sag_mask(record.probs, record.grid, tuple(x.shape[-2:]))
            mask = m if mask is None else torch.maximum(mask, m)
        x_degraded = sag_degrade(x, eps_c, alpha_bar, mask, self.sag[0].blur_sigma)
        return self._predict(x_degraded, t, self.cond)
