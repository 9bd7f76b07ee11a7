"""The distilled student: the embedded U-Net plus an embedding of the guidance scales (PAG s, CFG w).

Guidance distillation (Meng et al., CVPR 2023, stage one) for PAG: the student's one forward pass predicts the
teacher's guided noise ``eps_u + w (eps_c - eps_u) + s (eps_c - eps_perturbed)``. The scales enter as Fourier
features of ``(s, w)`` through a small MLP whose output is added to the U-Net's time embedding (before the class
embedding is added), so they reach every ResNet block's scale-shift conditioning. The MLP's last layer starts at
zero: a fresh student is the teacher, bit for bit, at every scale (its unguided prediction).

A student file is a safetensors file with the U-Net's tensors under ``unet.``, the MLP's under ``guidance.``, and
in its metadata the U-Net config (``denoiser``) and the student's own (``student``: the trained scale ranges, the
teacher's PAG layers and weights digest).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagkit.models.unet import NULL_CLASS, DenoiserConfig, build_unet
from pagkit.weights import WeightsError, load_tensors, save_tensors

WEIGHTS_DIR = Path(__file__).parent / "weights"


def default_student_path() -> Path:
    """The shipped student (distilled from the embedded denoiser with PAG on ``mid``)."""
    return WEIGHTS_DIR / "student.safetensors"


@dataclass(frozen=True)
class StudentConfig:
    """What the student was trained for: the scale ranges, the teacher's PAG layers, the embedding's size."""

    pag_max: float = 5.0  # s in [0, pag_max]
    cfg_max: float = 3.0  # w in [1, cfg_max]
    pag_layers: str = "mid"
    perturbation: str = "identity"
    frequencies: int = 6
    hidden: int = 256
    teacher: str = ""  # sha256 (16 hex) of the teacher's weights file

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_scales(self, pag_scale: float, cfg_scale: float, conditional: bool = True) -> None:
        """A one-line ``ValueError`` for scales outside the trained ranges (the student would extrapolate)."""
        if not (0.0 <= pag_scale <= self.pag_max):
            raise ValueError(
                f"PAG scale {pag_scale:g} is outside the distilled student's trained range [0, {self.pag_max:g}]: "
                f"use a scale in that range, or the teacher (--model embedded) for larger scales"
            )
        if not (1.0 <= cfg_scale <= self.cfg_max):
            raise ValueError(
                f"CFG scale {cfg_scale:g} is outside the distilled student's trained range [1, {self.cfg_max:g}]: "
                f"use a scale in that range, or the teacher (--model embedded)"
            )
        if cfg_scale != 1.0 and not conditional:
            raise ValueError("CFG needs a class label (--label 0..9); use --cfg-scale 1 for unconditional sampling")


class GuidanceEmbedding(nn.Module):
    """Fourier features of the normalised scales -> MLP -> a vector of the time embedding's width.

    The last layer is zero-initialised, so a fresh embedding adds exactly 0."""

    def __init__(self, dim: int, config: StudentConfig) -> None:
        super().__init__()
        self.pag_max, self.cfg_max = float(config.pag_max), float(config.cfg_max)
        self.freqs: torch.Tensor
        self.register_buffer(
            "freqs", math.pi * 2.0 ** torch.arange(config.frequencies, dtype=torch.float32), persistent=False
        )
        n_in = 2 + 4 * config.frequencies
        self.mlp = nn.Sequential(nn.Linear(n_in, config.hidden), nn.SiLU(), nn.Linear(config.hidden, dim))
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def features(self, pag_scale: torch.Tensor, cfg_scale: torch.Tensor) -> torch.Tensor:
        u = (pag_scale.float() / self.pag_max)[:, None]
        v = ((cfg_scale.float() - 1.0) / max(self.cfg_max - 1.0, 1e-6))[:, None]
        fu, fv = u * self.freqs, v * self.freqs
        return torch.cat([u, v, fu.sin(), fu.cos(), fv.sin(), fv.cos()], dim=1)

    def forward(self, pag_scale: torch.Tensor, cfg_scale: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(self.features(pag_scale, cfg_scale))
        return out


def _as_rows(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.expand(batch) if t.ndim == 0 else t.reshape(batch)


class StudentUNet(nn.Module):
    """``student(x, t, class_labels, pag_scale, cfg_scale) -> eps``: the guided noise in one forward pass."""

    is_student = True

    def __init__(self, unet: nn.Module, config: StudentConfig) -> None:
        super().__init__()
        self.unet = unet
        self.config = config
        dim: Any = unet.time_embedding.linear_2.out_features  # type: ignore[union-attr]
        self.guidance = GuidanceEmbedding(int(dim), config)

    @contextmanager
    def _added(self, g: torch.Tensor) -> Iterator[None]:
        """While inside: the U-Net's time embedding has ``g`` added (a hook that lives for one call)."""

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return output + g.to(output.dtype)

        handle = self.unet.time_embedding.register_forward_hook(hook)  # type: ignore[union-attr]
        try:
            yield
        finally:
            handle.remove()

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        pag_scale: torch.Tensor | float = 0.0,
        cfg_scale: torch.Tensor | float = 1.0,
    ) -> torch.Tensor:
        b = x.shape[0]
        if class_labels is None:
            class_labels = torch.full((b,), NULL_CLASS, dtype=torch.long, device=x.device)
        g = self.guidance(_as_rows(pag_scale, b, x.device), _as_rows(cfg_scale, b, x.device))
        return self.with_embedding(x, t, class_labels, g)

    def with_embedding(
        self, x: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor, g: torch.Tensor
    ) -> torch.Tensor:
        """The U-Net's prediction with a precomputed scale embedding ``g`` (``[B, D]``) added."""
        with self._added(g):
            out: torch.Tensor = self.unet(x, t, class_labels=class_labels).sample
        return out


def build_student(teacher: nn.Module, config: StudentConfig = StudentConfig()) -> StudentUNet:
    """A fresh student: a copy of ``teacher`` (its weights) plus a zero guidance embedding."""
    import copy

    unet = copy.deepcopy(teacher).train().requires_grad_(True)
    return StudentUNet(unet, config)


def save_student(
    path: str | os.PathLike[str],
    student: StudentUNet,
    denoiser: DenoiserConfig,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a student file (checked safetensors: ``unet.*``, ``guidance.*``, configs in the metadata)."""
    meta: dict[str, Any] = {"denoiser": denoiser.to_dict(), "student": student.config.to_dict(), **(extra or {})}
    save_tensors(path, dict(student.state_dict()), meta)


def is_student_file(path: str | os.PathLike[str]) -> bool:
    """Whether a weights file is a student (has the scale embedding); a damaged file raises WeightsError."""
    tensors, meta = load_tensors(path)
    return "student" in meta and any(k.startswith("guidance.") for k in tensors)


def load_student(path: str | os.PathLike[str] | None = None) -> tuple[StudentUNet, DenoiserConfig]:
    """Load a student file in eval mode; a plain denoiser file, a damaged or mismatched one is a WeightsError."""
    path = resolve_student_path(path)
    if path == default_student_path() and not path.is_file():
        raise WeightsError(
            f"no shipped student at {path}: distil one with `pagkit distill` and pass it with --student PATH"
        )
    tensors, meta = load_tensors(path)
    if "student" not in meta or not any(k.startswith("guidance.") for k in tensors):
        raise WeightsError(
            f"{path} is not a distilled student: it has no guidance-scale input (no 'guidance.*' tensors or student "
            "metadata). A plain denoiser samples with --model embedded --weights PATH; a student comes from "
            "`pagkit distill`"
        )
    if "denoiser" not in meta:
        raise WeightsError(f"{path} has no denoiser config in its metadata: is it a pagkit student file?")
    config = DenoiserConfig.from_dict(meta["denoiser"])
    student = StudentUNet(build_unet(config), StudentConfig.from_dict(meta["student"]))
    try:
        student.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except RuntimeError as e:
        raise WeightsError(
            f"{path} does not match its student/denoiser config (architecture mismatch): {str(e).splitlines()[0]}"
        ) from e
    return student.eval().requires_grad_(False), config


class StudentDenoiser:
    """``denoise(x, t, step) -> eps`` for the sampling loop: one student call per step at fixed (s, w)."""

    def __init__(
        self,
        student: StudentUNet,
        class_labels: torch.Tensor,
        pag_scale: float,
        cfg_scale: float = 1.0,
        autocast: torch.dtype | None = None,
    ) -> None:
        conditional = bool((class_labels != NULL_CLASS).all())
        student.config.check_scales(pag_scale, cfg_scale, conditional)
        self.student = student
        self.class_labels = class_labels
        self.pag_scale, self.cfg_scale = float(pag_scale), float(cfg_scale)
        self.autocast = autocast
        self.calls = 0
        b, dev = len(class_labels), class_labels.device
        with torch.no_grad():  # the scales are constant over the run: their embedding is computed once
            self.embedding = student.guidance(_as_rows(pag_scale, b, dev), _as_rows(cfg_scale, b, dev))

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, step: Any = None) -> torch.Tensor:
        self.calls += 1
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = self.student.with_embedding(x, t, self.class_labels, self.embedding)
        return out.to(x.dtype)


def check_student_options(
    student: Any,
    labels: Any,
    cfg_scale: float,
    pag_scale: float,
    pag_layers: str,
    pag_schedule: str | None,
    perturbation: str,
    reuse_delta: int,
    sag_scale: float,
) -> None:
    """The sampling options a student serves (one line each otherwise): its scale ranges, its teacher's PAG
    layers and perturbation, constant scales, no cached delta, no SAG."""
    import numpy as np

    conditional = bool((np.asarray(labels) >= 0).all())
    student.config.check_scales(pag_scale, cfg_scale, conditional)
    c = student.config
    if pag_scale != 0.0 and ",".join(s.strip() for s in str(pag_layers).split(",")) != c.pag_layers:
        raise ValueError(
            f"the distilled student learned PAG on {c.pag_layers!r}, not {pag_layers!r}: drop --pag-layers, or "
            "distil another student with --pag-layers"
        )
    if perturbation != c.perturbation:
        raise ValueError(f"the distilled student learned the {c.perturbation!r} perturbation, not {perturbation!r}")
    if pag_schedule not in (None, "", "constant"):
        raise ValueError("the distilled student takes a constant PAG scale: drop --pag-schedule")
    if reuse_delta != 1:
        raise ValueError("the distilled student makes one call per step already: --reuse-delta does not apply")
    if sag_scale != 0.0:
        raise ValueError("SAG is not distilled into the student: use --sag-scale 0")


_CACHE: dict[tuple[str, str, str], tuple[StudentUNet, DenoiserConfig]] = {}


def resolve_student_path(spec: str | os.PathLike[str] | None) -> Path:
    """A student file: ``spec``, or for None/``default`` ``$PAGKIT_STUDENT`` when set (e.g. a run's
    ``runs/distill-student/student.safetensors`` for ``distilled:`` eval configs), else the shipped one."""
    if spec is None or str(spec) in ("", "default"):
        env = os.environ.get("PAGKIT_STUDENT")
        return Path(env) if env else default_student_path()
    return Path(spec)


def student_digest(spec: str | os.PathLike[str] | None) -> str:
    """sha256 (16 hex) of a student file's bytes (``default``: the shipped one)."""
    from pagkit.parts import file_digest

    path = resolve_student_path(spec)
    if not path.is_file():
        raise WeightsError(f"student file {path} not found: distil one with `pagkit distill` (see docs/distill.md)")
    return file_digest(path)


def cached_student(
    spec: str | os.PathLike[str], digest: str | None, device: torch.device | str = "cpu"
) -> tuple[StudentUNet, DenoiserConfig]:
    """A student loaded once per (file, content, device); ``digest`` (when given) must match the file."""
    path = resolve_student_path(spec)
    now = student_digest(path)
    if digest is not None and digest != now:
        raise WeightsError(f"student file {path} changed since this evaluation was set up: rerun it")
    key = (str(path.resolve()), now, str(device))
    if key not in _CACHE:
        student, config = load_student(path)
        _CACHE[key] = (student.to(device), config)
    return _CACHE[key]
