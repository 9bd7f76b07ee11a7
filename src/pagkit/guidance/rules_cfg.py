"""Classifier-free guidance's combine rules as terms: APG, CFG-Zero*, CFG++, CFG-rescale (and CFG's interval).

Each replaces CFG's ``(w - 1)(eps_c - eps_u)`` by its own contribution to ``eps_c``; all read the
unconditional branch, so they compose with the weak-branch terms (PAG, SEG, ...) by addition, as CFG does.
The guidance interval (Kynkaenniemi et al., arXiv 2404.07724) is any term's schedule, e.g.
``interval-sigma:5:0.3`` (on for sigma in [0.3, 5]) or ``interval:0.2:0.8`` (fractions of the run).

- :class:`APG` (Sadat et al., arXiv 2410.02416, Algorithm 1): the guidance update ``D_c - D_u`` split into its
  parts parallel and orthogonal to ``D_c``; the parallel part (which oversaturates) is scaled by ``eta``, the
  update's norm optionally capped at ``norm_threshold``: ``D = D_c + (w - 1)(orth + eta * parallel)``. Like the
  paper, pagkit projects in the space of the denoised prediction ``D = x0`` (it needs the sample ``x_t`` and
  sigma, which our loop hands to the terms); ``space="eps"`` projects onto ``eps_c`` as diffusers' guider does
  for an epsilon-prediction model. ``momentum`` (the paper's beta, negative in the paper, 0: off) adds beta times
  the previous step's (momentum-averaged) difference to this step's, in the projection's space, as the paper and
  diffusers' ``MomentumBuffer``; the engine carries it from step to step and starts it afresh with every run.
- :class:`CFGZeroStar` (Fan et al., arXiv 2503.18886): the unconditional prediction scaled by the optimized
  ``s* = <eps_c, eps_u> / |eps_u|^2`` (per image): ``s* eps_u + w (eps_c - s* eps_u)``. The paper's zero-init
  (the first steps' velocity set to 0) is defined for flow-matching velocities; for an epsilon-prediction DDIM
  ``eps = 0`` does not mean "stay" but ``x0 = x_t / sqrt(alpha_bar)``, so pagkit implements the optimized scale
  only (diffusers' guider with ``zero_init_steps=0``).
- :class:`CFGPP` (Chung et al., arXiv 2406.08070): ``x0`` from ``eps_u + lambda (eps_c - eps_u)`` (lambda in
  [0, 1]) and the DDIM step renoised with ``eps_u`` instead of the guided eps. The renoising needs the sampler:
  :func:`pagkit.sampling.loops.sample` takes ``(eps, eps_renoise)`` from a denoiser (:class:`Renoising` wraps a
  guided denoiser) and makes the DDIM step with them; other terms (PAG, ...) move ``x0`` only. DDPM is refused.
  ``lambda = 1`` is treated as off (no unconditional branch, plain DDIM), the engine's convention for a weight 0.
- :class:`RescaledCFG` (Lin et al. 2023, Sec. 3.4): CFG rescaled to the conditional prediction's standard
  deviation and mixed with ``phi``: ``phi * cfg * std(eps_c) / std(cfg) + (1 - phi) * cfg``. It rescales its own
  CFG result; terms added beside it are not rescaled (diffusers rescales the sum of CFG and PAG).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pagkit.guidance.rules import check_scale
from pagkit.guidance.schedules import CONSTANT, Schedule, Step
from pagkit.guidance.term import COND, UNCOND, Branch, Term

SAMPLE, SIGMA = "x_t", "sigma"  # extra entries of the predictions for terms that work on the denoised x0
# or, instead of SIGMA, the coefficients (a, b) of the denoised estimate x0 = a x_t + b prediction (any
# parameterisation: a VP epsilon model has a = sqrt(1 + sigma^2), b = -sigma; a flow velocity model a = 1, b = -s)
X0_COEFFICIENTS = "x0_coefficients"


def _dims(t: torch.Tensor) -> list[int]:
    return list(range(1, t.ndim))


class _CFGLike(Term):
    """A rule on ``eps_c`` and ``eps_u`` with CFG's scale convention (``w = 1``: off)."""

    scale: float
    schedule: Schedule

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(UNCOND, UNCOND),)

    def scale_at(self, step: Step) -> float:
        return (self.scale - 1.0) * self.schedule(step)

    def weight(self, step: Step) -> float:
        return self.scale_at(step)


def project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v0``'s parts parallel and orthogonal to ``v1`` (per image, in float64 as the paper's code)."""
    dims = _dims(v0)
    a, b = v0.double(), v1.double()
    b = b / torch.linalg.vector_norm(b, dim=dims, keepdim=True).clamp_min(1e-12)  # F.normalize over dims
    parallel = (a * b).sum(dim=dims, keepdim=True) * b
    return parallel.to(v0.dtype), (a - parallel).to(v0.dtype)


def apg_update(diff: torch.Tensor, direction: torch.Tensor, eta: float, norm_threshold: float) -> torch.Tensor:
    """APG's update of the guidance difference ``diff`` against the prediction ``direction`` (Algorithm 1)."""
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=_dims(diff), keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    parallel, orthogonal = project(diff, direction)
    return orthogonal + eta * parallel


@dataclass(frozen=True)
class APG(_CFGLike):
    """Adaptive projected guidance with scale ``w`` (CFG's convention), ``eta`` and ``norm_threshold``."""

    scale: float = 4.0
    eta: float = 0.0
    norm_threshold: float = 0.0
    space: str = "x0"
    schedule: Schedule = CONSTANT
    momentum: float = 0.0

    def __post_init__(self) -> None:
        check_scale("apg scale", self.scale)
        check_scale("apg eta", self.eta)
        if not (math.isfinite(self.norm_threshold) and self.norm_threshold >= 0):
            raise ValueError(f"apg norm_threshold must be >= 0 (0: off), got {self.norm_threshold}")
        if self.space not in ("x0", "eps"):
            raise ValueError(f"apg space must be 'x0' (the paper) or 'eps', got {self.space!r}")
        if not (math.isfinite(self.momentum) and -1.0 < self.momentum < 1.0):
            raise ValueError(f"apg momentum must lie in (-1, 1) (the paper uses -0.5; 0: off), got {self.momentum}")

    @property
    def stateful(self) -> bool:
        return self.momentum != 0.0

    @property
    def linear(self) -> bool:
        return self.momentum == 0.0

    def combine(self, preds: Mapping[str, torch.Tensor], weight: float) -> torch.Tensor:
        return self.combine_carry(preds, weight, None)[0]

    def combine_carry(
        self, preds: Mapping[str, torch.Tensor], weight: float, carry: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        c, u = preds[COND], preds[UNCOND]
        if self.space == "eps":
            diff = self._momentum(c - u, carry)
            return weight * apg_update(diff, c, self.eta, self.norm_threshold), diff if self.stateful else None
        if SAMPLE not in preds or (SIGMA not in preds and X0_COEFFICIENTS not in preds):
            raise ValueError(
                "APG in x0 space needs the sample x_t and how the model's prediction gives x0 (pagkit's own loop "
                "and epsilon or flow-matching pipelines hand them over); use APG(space='eps') where they are not "
                "available"
            )
        x = preds[SAMPLE]
        if X0_COEFFICIENTS in preds:
            a, b = preds[X0_COEFFICIENTS].to(c.dtype)
        else:  # VP model: x0 = (x - sqrt(1 - a) eps) / sqrt(a) = sqrt(1 + sigma^2) x - sigma eps
            sigma = preds[SIGMA].to(c.dtype)
            a, b = torch.sqrt(1 + sigma**2), -sigma
        d_c = a * x + b * c
        diff = self._momentum(b * (c - u), carry)
        update = apg_update(diff, d_c, self.eta, self.norm_threshold)
        return weight * (update / b), diff if self.stateful else None

    def _momentum(self, diff: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
        if carry is None or not self.stateful:
            return diff
        if carry.shape != diff.shape:
            raise ValueError(f"apg momentum: this step has {diff.shape[0]} rows, the previous one {carry.shape[0]}")
        return diff + self.momentum * carry


def zero_star_scale(c: torch.Tensor, u: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CFG-Zero*'s optimized scale ``<c, u> / (|u|^2 + eps)`` per image, shaped to broadcast."""
    cf, uf = c.flatten(1).float(), u.flatten(1).float()
    s = (cf * uf).sum(1, keepdim=True) / ((uf**2).sum(1, keepdim=True) + eps)
    return s.to(c.dtype).view(-1, *(1,) * (c.ndim - 1))


@dataclass(frozen=True)
class CFGZeroStar(_CFGLike):
    """CFG-Zero*: ``s* eps_u + w (eps_c - s* eps_u)`` with the optimized scale ``s*`` (per image)."""

    scale: float = 2.0
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        check_scale("cfg-zero* scale", self.scale)

    def combine(self, preds: Mapping[str, torch.Tensor], weight: float) -> torch.Tensor:
        c, u = preds[COND], preds[UNCOND]
        return weight * (c - zero_star_scale(c, u) * u)


@dataclass(frozen=True)
class CFGPP(_CFGLike):
    """CFG++ with ``lambda = scale`` in [0, 1]: x0 from ``eps_u + lambda (eps_c - eps_u)``, renoised with ``eps_u``."""

    scale: float = 0.6
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        check_scale("cfg++ scale", self.scale)
        if not 0.0 <= self.scale <= 1.0:
            raise ValueError(f"cfg++ scale (lambda) must lie in [0, 1], got {self.scale}")

    def combine(self, preds: Mapping[str, torch.Tensor], weight: float) -> torch.Tensor:
        return weight * (preds[COND] - preds[UNCOND])


def rescale_noise(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al.'s rescale: ``phi * guided * std(cond) / std(guided) + (1 - phi) * guided`` (per image)."""
    dims = _dims(guided)
    std_c = cond.std(dim=dims, keepdim=True)
    std_g = guided.std(dim=dims, keepdim=True)
    return phi * (guided * (std_c / std_g)) + (1 - phi) * guided


@dataclass(frozen=True)
class RescaledCFG(_CFGLike):
    """CFG with scale ``w`` rescaled toward the conditional prediction's std by ``phi`` (0: plain CFG)."""

    scale: float = 3.0
    phi: float = 0.7
    schedule: Schedule = CONSTANT

    def __post_init__(self) -> None:
        check_scale("cfg-rescale scale", self.scale)
        if not 0.0 <= self.phi <= 1.0:
            raise ValueError(f"cfg-rescale phi must lie in [0, 1], got {self.phi}")

    @property
    def linear(self) -> bool:
        return False

    def combine(self, preds: Mapping[str, torch.Tensor], weight: float) -> torch.Tensor:
        c, u = preds[COND], preds[UNCOND]
        guided = c + weight * (c - u)
        return rescale_noise(guided, c, self.phi) - c


class Renoised(tuple):
    """``(eps, eps_renoise)``: a denoiser's answer asking the sampler to renoise with ``eps_renoise`` (CFG++)."""


class Renoising:
    """Wraps a :class:`~pagkit.guidance.engine.GuidedDenoiser` with a :class:`CFGPP` term: at steps where the
    term is active it returns ``(eps, eps_u)`` so that :func:`pagkit.sampling.loops.sample` renoises with
    ``eps_u``; elsewhere the plain eps."""

    def __init__(self, denoiser: Any, term: CFGPP) -> None:
        self.denoiser = denoiser
        self.term = term

    def __call__(self, x: torch.Tensor, t: Any, step: Step) -> torch.Tensor | Renoised:
        eps = self.denoiser(x, t, step)
        if self.term.scale_at(step) == 0.0:
            return eps
        return Renoised((eps, self.denoiser.last_predictions[UNCOND]))


def renoising(denoiser: Any, terms: list[Term]) -> Callable[..., Any]:
    """``denoiser`` itself, or wrapped in :class:`Renoising` when ``terms`` hold a CFG++ term."""
    pp = [t for t in terms if isinstance(t, CFGPP)]
    if len(pp) > 1:
        raise ValueError("give at most one CFG++ term")
    return Renoising(denoiser, pp[0]) if pp else denoiser
