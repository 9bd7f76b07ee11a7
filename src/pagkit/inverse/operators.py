"""Measurement operators ``y = A(x) + sigma n`` for inverse problems, on images ``[B, C, H, W]`` in [-1, 1].

Every operator is a small frozen dataclass with no learned parameters:

- ``forward(x)``: ``A(x)``, differentiable (DPS takes its gradient through ``A``);
- ``check(shape)``: raises :class:`OperatorError` for an image size (or mask shape) it cannot handle, so that
  errors come before sampling starts;
- ``measure(x, sigma, generators)``: ``A(x) + sigma n`` with one generator per image;
- ``display(y)``: the measurement as an image of the input's size (e.g. nearest upsampling for SR), for figures.

The embedded model works on a 32x32 canvas that holds the 28x28 Fashion-MNIST image padded with -1; the
operators act on the 28x28 image itself (:func:`crop` cuts it out of the canvas), so the measurement carries no
information about the padding. Register a new operator with :func:`register` (see ``TASKS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class OperatorError(ValueError):
    """An operator cannot be built or cannot handle the given image size, mask or measurement."""


class Operator(Protocol):
    name: str

    def check(self, shape: Sequence[int]) -> None: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def measure(self, x: torch.Tensor, sigma: float, generators: Sequence[torch.Generator]) -> torch.Tensor: ...

    def display(self, y: torch.Tensor) -> torch.Tensor: ...


def _check_image(shape: Sequence[int], name: str) -> tuple[int, int]:
    if len(shape) != 4:
        raise OperatorError(f"{name}: images must be [B, C, H, W], got shape {tuple(shape)}")
    return int(shape[-2]), int(shape[-1])


def crop(x: torch.Tensor, size: int = 28) -> torch.Tensor:
    """The centred ``size x size`` image ``[B, C, size, size]`` of a model-space canvas ``[B, C, S, S]``."""
    s = x.shape[-1]
    if x.shape[-2] != s or s < size or (s - size) % 2:
        raise OperatorError(f"cannot cut a centred {size}x{size} image out of a {tuple(x.shape[-2:])} canvas")
    c = (s - size) // 2
    return x[..., c : c + size, c : c + size]


def noise_like(y: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Unit Gaussian noise shaped like ``y: [B, ...]``, row i drawn from ``generators[i]`` only."""
    if len(generators) != y.shape[0]:
        raise OperatorError(f"need one generator per image: {len(generators)} for a batch of {y.shape[0]}")
    return torch.stack([torch.randn(y.shape[1:], generator=g, dtype=y.dtype) for g in generators]).to(y.device)


class _Base:
    name: str = "operator"

    def check(self, shape: Sequence[int]) -> None:
        _check_image(shape, self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def measure(self, x: torch.Tensor, sigma: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """``y = A(x) + sigma n``, ``n ~ N(0, I)`` drawn per image (DPS's Gaussian measurement noise)."""
        if not (sigma >= 0.0 and math.isfinite(sigma)):
            raise OperatorError(f"measurement noise sigma must be a finite number >= 0, got {sigma}")
        self.check(x.shape)
        y = self.forward(x)
        return y + sigma * noise_like(y, generators) if sigma > 0 else y

    def display(self, y: torch.Tensor) -> torch.Tensor:
        return y


@dataclass(frozen=True)
class Inpaint(_Base):
    """Box inpainting: ``A(x) = m * x`` with a 0/1 mask ``m`` ``[H, W]`` (0: missing).

    By default a centred ``box x box`` square is missing; ``mask`` gives any other mask (1: observed). The noise
    of masked-out pixels is masked too (``y = m * (x + sigma n)``): those entries carry no information either way.
    """

    box: int = 14
    mask: torch.Tensor | None = field(default=None, compare=False)
    name: str = "inpaint"

    def __post_init__(self) -> None:
        if self.mask is None and self.box < 1:
            raise OperatorError(f"inpaint: the box size must be >= 1, got {self.box}")
        if self.mask is not None:
            m = self.mask
            if m.ndim != 2 or not torch.isfinite(m.float()).all() or not ((m == 0) | (m == 1)).all():
                raise OperatorError(f"inpaint: the mask must be a 0/1 tensor [H, W], got shape {tuple(m.shape)}")

    def mask_for(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        """The 0/1 mask ``[H, W]`` for images of this size (1: observed)."""
        if self.mask is not None:
            if tuple(self.mask.shape) != (h, w):
                raise OperatorError(f"inpaint: the mask has shape {tuple(self.mask.shape)} but the images are {h}x{w}")
            return self.mask.to(device=device, dtype=torch.float32)
        if self.box > min(h, w):
            raise OperatorError(f"inpaint: a {self.box}x{self.box} box does not fit in {h}x{w} images")
        m = torch.ones(h, w, device=device)
        top, left = (h - self.box) // 2, (w - self.box) // 2
        m[top : top + self.box, left : left + self.box] = 0.0
        return m

    def check(self, shape: Sequence[int]) -> None:
        self.mask_for(*_check_image(shape, self.name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask_for(x.shape[-2], x.shape[-1], device=x.device).to(x.dtype)

    def measure(self, x: torch.Tensor, sigma: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
        return self.forward(super().measure(x, sigma, generators))


@dataclass(frozen=True)
class SuperResolution(_Base):
    """``factor``-times super-resolution: ``A(x)`` = ``factor x factor`` average pooling, ``[B, C, H/f, W/f]``."""

    factor: int = 4
    name: str = "sr"

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise OperatorError(f"super-resolution: the factor must be >= 1, got {self.factor}")

    def check(self, shape: Sequence[int]) -> None:
        h, w = _check_image(shape, self.name)
        if h % self.factor or w % self.factor:
            raise OperatorError(
                f"{self.factor}x super-resolution needs an image size divisible by {self.factor}, got {h}x{w}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x.shape)
        return F.avg_pool2d(x, self.factor)

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint ``A^T y``: each low-resolution pixel spread evenly over its ``factor x factor`` block."""
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor**2

    def display(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour upsampling back to the image size."""
        return F.interpolate(y, scale_factor=self.factor, mode="nearest")


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """A normalised ``size x size`` Gaussian kernel (``size`` odd)."""
    if size < 1 or size % 2 == 0 or not sigma > 0:
        raise OperatorError(f"Gaussian kernel: size must be odd and >= 1, sigma > 0; got {size}, {sigma}")
    r = torch.arange(size, dtype=torch.float32) - size // 2
    k1 = torch.exp(-0.5 * (r / sigma) ** 2)
    k = torch.outer(k1, k1)
    return k / k.sum()


@dataclass(frozen=True)
class GaussianDeblur(_Base):
    """Gaussian blur ``A(x) = k * x`` with a ``kernel x kernel`` kernel of std ``sigma`` and reflect padding
    (the output has the input's size)."""

    kernel: int = 5
    sigma: float = 1.5
    name: str = "deblur"

    def __post_init__(self) -> None:
        gaussian_kernel(self.kernel, self.sigma)

    def check(self, shape: Sequence[int]) -> None:
        h, w = _check_image(shape, self.name)
        if min(h, w) <= self.kernel // 2:
            raise OperatorError(f"deblur: a {self.kernel}x{self.kernel} kernel needs images larger than {h}x{w}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x.shape)
        c, r = x.shape[1], self.kernel // 2
        k = gaussian_kernel(self.kernel, self.sigma).to(x.device, x.dtype)
        padded = F.pad(x, (r, r, r, r), mode="reflect")
        return F.conv2d(padded, k.expand(c, 1, -1, -1), groups=c)


TASKS: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any]) -> None:
    """Make ``factory(**options)`` available as task ``name`` (``pagkit restore --task``, :func:`make_operator`)."""
    if name in TASKS:
        raise OperatorError(f"task {name!r} is already registered")
    TASKS[name] = factory


register("inpaint", lambda **kw: Inpaint(**{"box": 14, **kw, "name": "inpaint"}))
register("sr4", lambda **kw: SuperResolution(**{"factor": 4, **kw, "name": "sr4"}))
register("deblur", lambda **kw: GaussianDeblur(**{"kernel": 5, "sigma": 1.5, **kw, "name": "deblur"}))


def make_operator(task: str, **options: Any) -> Operator:
    """The operator of a registered task (``inpaint``: 14x14 centred box; ``sr4``: 4x average pooling;
    ``deblur``: Gaussian kernel 5, sigma 1.5), with optional overrides of its fields."""
    if task not in TASKS:
        raise OperatorError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    try:
        return TASKS[task](**options)
    except TypeError as e:
        raise OperatorError(f"task {task!r}: bad options {sorted(options)} ({e})") from None
