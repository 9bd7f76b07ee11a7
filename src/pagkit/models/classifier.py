"""The embedded Fashion-MNIST classifier, used as the default feature network for metrics."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagkit.weights import WeightsError, load_tensors

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ClassifierConfig:
    """Widths of the classifier's three conv stages and its feature dimension."""

    widths: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    dropout: float = 0.3

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "widths" in known:
            known["widths"] = tuple(known["widths"])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class FashionClassifier(nn.Module):
    """A small VGG-style CNN on ``[B, 1, 28, 28]`` images in [-1, 1]; ``features`` gives ``[B, feature_dim]``."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        self.body = nn.Sequential(
            _stage(1, w[0]),
            nn.MaxPool2d(2),
            _stage(w[0], w[1]),
            nn.MaxPool2d(2),
            _stage(w[1], w[2]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(w[2], config.feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` of images ``[B, 1, 28, 28]``."""
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"the classifier takes images [B, 1, 28, 28] in [-1, 1], got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, 10]``."""
        return self.head(self.features(x))


def default_classifier_path() -> Path:
    return WEIGHTS_DIR / "classifier.safetensors"


def load_classifier(path: str | os.PathLike[str] | None = None) -> FashionClassifier:
    """Load the embedded classifier (or one written by ``pagkit train-classifier``) in eval mode."""
    path = Path(path) if path is not None else default_classifier_path()
    tensors, meta = load_tensors(path)
    if "classifier" not in meta:
        raise WeightsError(f"{path} has no classifier config in its metadata: is it a pagkit classifier file?")
    model = FashionClassifier(ClassifierConfig.from_dict(meta["classifier"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not match its config: {str(e).splitlines()[0]}") from e
    return model.eval().requires_grad_(False)
