"""Perturbation ops: what a perturbed self-attention layer computes instead of softmax(QK^T/sqrt(d)) V.

Each op works per head on ``q, k, v: [B, H, N, D]`` and returns ``[B, H, N, D]``. ``identity`` (PAG, Ahn et al.
Sec. 3.3) never needs Q or K: it declares ``needs_qk = False`` and gets only ``v``. The others are the paper's
ablations of the perturbation type; they modify the attention map ``P = softmax(QK^T * scale)``:

========== ==========================================================================
identity   P = I: each token keeps its own value (PAG)
soft       P = (1 - alpha) P + alpha I (a partial perturbation toward the identity)
mask       off-diagonal logits masked at random with probability p; the diagonal is kept
dropout    dropout on P with probability p (rescaled by 1/(1-p), as attention dropout)
blur       each query's map, seen as an image over the key grid, Gaussian-blurred (sigma)
pool       each query's map average-pooled over the key grid (kernel k, stride 1)
noise      Gaussian noise of std sigma added to the logits before the softmax
========== ==========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def token_grid(n: int, grid: tuple[int, int] | None, user: str = "this perturbation") -> tuple[int, int]:
    """The (h, w) token grid of a layer with ``n`` tokens: ``grid`` if it fits, else the square one."""
    if grid is not None and grid[0] * grid[1] == n:
        return grid
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{user} needs a square token grid, but the layer has {n} tokens")
    return side, side


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return (q.float() @ k.float().transpose(-1, -2) * scale).softmax(-1)


def _renorm(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


def _over_key_grid(p: torch.Tensor, grid: tuple[int, int] | None, fn: object) -> torch.Tensor:
    """Apply ``fn`` to each query's map ``[*, h, w]`` over the key grid and renormalise the rows."""
    b, h, n, m = p.shape
    gh, gw = token_grid(m, grid)
    maps = p.reshape(b * h * n, 1, gh, gw)
    out = fn(maps)  # type: ignore[operator]
    return _renorm(out.reshape(b, h, n, m))


@dataclass
class Perturbation:
    """Base class: a named attention op with its parameters (see the module docstring)."""

    name: str = "identity"
    needs_qk: bool = True
    seed: int = 0
    _gen: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded once per op, so the random ablations are reproducible run to run."""
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
        return self._gen

    def _check(self, param: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"perturbation {self.name!r}: {param} must be {expected}, got {getattr(self, param)!r}")

    def attend(
        self,
        q: torch.Tensor | None,
        k: torch.Tensor | None,
        v: torch.Tensor,
        scale: float,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Identity(Perturbation):
    """PAG's perturbation: the attention map is the identity, so the output is ``v`` itself."""

    name: str = "identity"
    needs_qk: bool = False

    def attend(self, q, k, v, scale, grid=None):
        return v


@dataclass
class Soft(Perturbation):
    """Interpolate the map toward the identity: ``(1 - alpha) softmax(.) V + alpha V``."""

    name: str = "soft"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        self._check("alpha", 0.0 <= self.alpha <= 1.0, "in [0, 1]")

    def attend(self, q, k, v, scale, grid=None):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return torch.lerp(out, v, self.alpha)


@dataclass
class RandomMask(Perturbation):
    """Mask off-diagonal logits at random (probability ``p``), keeping the diagonal."""

    name: str = "mask"
    p: float = 0.5

    def __post_init__(self) -> None:
        self._check("p", 0.0 <= self.p <= 1.0, "in [0, 1]")

    def attend(self, q, k, v, scale, grid=None):
        b, h, n, _ = q.shape
        drop = torch.rand((b, h, n, n), generator=self.generator(q.device), device=q.device) < self.p
        drop &= ~torch.eye(n, dtype=torch.bool, device=q.device)
        logits = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(drop, float("-inf"))
        return (logits.softmax(-1) @ v.float()).to(v.dtype)


@dataclass
class Dropout(Perturbation):
    """Attention dropout on the map with probability ``p``."""

    name: str = "dropout"
    p: float = 0.5

    def __post_init__(self) -> None:
        self._check("p", 0.0 <= self.p < 1.0, "in [0, 1) (p = 1 drops the whole map)")

    def attend(self, q, k, v, scale, grid=None):
        p = _probs(q, k, scale)
        keep = torch.rand(p.shape, generator=self.generator(q.device), device=q.device) >= self.p
        return (p * keep / (1.0 - self.p) @ v.float()).to(v.dtype)


def gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel of radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with reflect padding."""
    kernel = gaussian_kernel1d(sigma, images.device).to(images.dtype)
    r = len(kernel) // 2
    c = images.shape[1]
    x = F.pad(images, (r, r, 0, 0), mode="reflect" if images.shape[-1] > r else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="reflect" if images.shape[-2] > r else "replicate")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@dataclass
class Blur(Perturbation):
    """Gaussian blur (``sigma`` in tokens) of each query's attention map over the key grid."""

    name: str = "blur"
    sigma: float = 1.0

    def __post_init__(self) -> None:
        self._check("sigma", self.sigma > 0.0, "positive")

    def attend(self, q, k, v, scale, grid=None):
        p = _over_key_grid(_probs(q, k, scale), grid, lambda m: gaussian_blur(m, self.sigma))
        return (p @ v.float()).to(v.dtype)


@dataclass
class Pool(Perturbation):
    """Average pooling (kernel ``kernel``, stride 1) of each query's attention map over the key grid."""

    name: str = "pool"
    kernel: int = 3

    def __post_init__(self) -> None:
        self._check("kernel", self.kernel >= 1 and self.kernel % 2 == 1, "a positive odd integer")

    def attend(self, q, k, v, scale, grid=None):
        pool = lambda m: F.avg_pool2d(m, self.kernel, 1, self.kernel // 2, count_include_pad=False)  # noqa: E731
        p = _over_key_grid(_probs(q, k, scale), grid, pool)
        return (p @ v.float()).to(v.dtype)


@dataclass
class Noise(Perturbation):
    """Additive Gaussian noise (std ``sigma``) on the attention logits."""

    name: str = "noise"
    sigma: float = 1.0

    def __post_init__(self) -> None:
        self._check("sigma", self.sigma >= 0.0, "non-negative")

    def attend(self, q, k, v, scale, grid=None):
        logits = q.float() @ k.float().transpose(-1, -2) * scale
        logits = logits + self.sigma * torch.randn(logits.shape, generator=self.generator(q.device), device=q.device)
        return (logits.softmax(-1) @ v.float()).to(v.dtype)


OPS: dict[str, type[Perturbation]] = {
    "identity": Identity,
    "soft": Soft,
    "mask": RandomMask,
    "dropout": Dropout,
    "blur": Blur,
    "pool": Pool,
    "noise": Noise,
}


def make_perturbation(spec: str | Perturbation) -> Perturbation:
    """Build an op from a name with optional parameters, e.g. ``"identity"``, ``"dropout:0.3"``, ``"soft:0.7"``."""
    if isinstance(spec, Perturbation):
        return spec
    name, _, arg = spec.partition(":")
    if name not in OPS:
        raise ValueError(f"unknown perturbation {name!r}: use one of {', '.join(OPS)}")
    cls = OPS[name]
    if not arg:
        return cls()
    params = [f for f in cls.__dataclass_fields__ if f not in ("name", "needs_qk", "seed", "_gen")]
    if not params:
        raise ValueError(f"perturbation {name!r} takes no parameter, got {arg!r}")
    try:
        value = float(arg) if params[0] != "kernel" else int(arg)
    except ValueError as e:
        raise ValueError(f"bad parameter {arg!r} for perturbation {name!r}: expected a number") from e
    if not math.isfinite(value):
        raise ValueError(f"perturbation parameter must be finite, got {arg!r}")
    return cls(**{params[0]: value})  # type: ignore[arg-type]
