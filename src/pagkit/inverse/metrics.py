"""Restoration metrics: PSNR and SSIM against the ground truth (torchmetrics), feature-network FID of the
restorations against the ground-truth images, and the classifier's accuracy on the restorations.

All take uint8 images ``[N, 28, 28]``. PSNR is the mean of per-image PSNRs (dB, data range 255); SSIM the mean
SSIM (Gaussian window 11, sigma 1.5). FID uses the feature network of :mod:`pagkit.eval.features` (the embedded
classifier's penultimate layer by default) and is undefined (``None``) for fewer images than feature dimensions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _unit(images: np.ndarray) -> torch.Tensor:
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"metrics take uint8 images [N, H, W], got {images.dtype} {images.shape}")
    return torch.from_numpy(images).float().unsqueeze(1) / 255.0


def _pair(restored: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _unit(restored), _unit(targets)
    if a.shape != b.shape:
        raise ValueError(f"restorations {tuple(a.shape)} and targets {tuple(b.shape)} differ in shape")
    return a, b


def psnr(restored: np.ndarray, targets: np.ndarray) -> float:
    """Mean per-image PSNR in dB (``inf`` where an image is restored exactly)."""
    from torchmetrics.image import PeakSignalNoiseRatio

    a, b = _pair(restored, targets)
    metric = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    return float(metric(a, b))


def ssim(restored: np.ndarray, targets: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) over the images."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    a, b = _pair(restored, targets)
    return float(StructuralSimilarityIndexMeasure(data_range=1.0)(a, b))


def restoration_metrics(
    restored: np.ndarray,
    targets: np.ndarray,
    labels: np.ndarray,
    feature_net: str = "classifier",
    progress: bool = False,
) -> dict[str, Any]:
    """PSNR, SSIM, FID (restorations vs targets; ``None`` below the feature dimension) and the accuracy of the
    classifier on the restorations (``accuracy``) and on the targets (``target_accuracy``, its ceiling)."""
    from pagkit.eval.features import extract, load_feature_net, probe
    from pagkit.eval.metrics import fid

    labels = np.asarray(labels)
    if labels.shape != (len(restored),):
        raise ValueError(f"need one label per image: {labels.shape} for {len(restored)} images")
    net = load_feature_net(feature_net)
    dim = probe(net)
    feats_r = extract(net, restored, progress=progress, desc="features (restored)")
    feats_t = extract(net, targets, progress=progress, desc="features (targets)")
    result: dict[str, Any] = {
        "n": len(restored),
        "psnr": psnr(restored, targets),
        "ssim": ssim(restored, targets),
        "fid": fid(feats_t, feats_r) if len(restored) >= dim else None,
        "feature_net": net.name,
    }
    if hasattr(net, "logits"):
        pred_r = extract(net, restored, progress=progress, logits=True).argmax(1)
        pred_t = extract(net, targets, progress=progress, logits=True).argmax(1)
        result["accuracy"] = float((pred_r == labels).mean())
        result["target_accuracy"] = float((pred_t == labels).mean())
    return result
