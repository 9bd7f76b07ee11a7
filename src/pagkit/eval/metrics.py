"""Sample-quality metrics from feature arrays: FID, KID, Inception-style score (torchmetrics), P/R/D/C (prdc).

Features are computed once per image set (:mod:`pagkit.eval.features`) and handed to torchmetrics through a
pass-through ``feature=`` module, so the (possibly slow) network runs once for all metrics and the reference
features can be cached. FID accumulates in float64 (torchmetrics' states). Random subsets (KID, IS splits, the
reference subsample of precision/recall) are drawn from a fixed seed, so the numbers are reproducible.

- FID: Frechet distance between Gaussians fitted to real and generated features (Heusel et al. 2017).
- KID: unbiased polynomial-kernel MMD^2 over random subsets (Binkowski et al. 2018).
- IS: ``exp E_x KL(p(y|x) || p(y))`` over the classifier's softmax (Salimans et al. 2016), in ``splits`` splits.
- precision, recall (Kynkaanniemi et al. 2019) and density, coverage (Naeem et al. 2020), k-NN manifolds with
  k = 5; the reference set is subsampled to the number of generated images (equal set sizes, as in both papers).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


class MetricError(ValueError):
    """The sets are too small, or their features do not match, for a metric to be defined."""


@dataclass(frozen=True)
class MetricSettings:
    """Every metric parameter in one place (the defaults are the papers' and torchmetrics')."""

    k: int = 5  # nearest neighbours of the precision/recall/density/coverage manifolds
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at the set sizes
    is_splits: int = 10  # capped at the number of images
    seed: int = 0


class GivenFeatures(nn.Module):
    """torchmetrics' ``feature=`` module for features computed beforehand: passes ``[N, d]`` through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Fix torch's global RNG (used by torchmetrics' random subsets) inside the block, restoring it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_sizes(n_fake: int, n_real: int, dim: int, settings: MetricSettings = MetricSettings()) -> None:
    """Fail early when a metric is undefined for these set sizes and feature dimension."""
    for what, n in (("generated", n_fake), ("reference", n_real)):
        if n < dim:
            raise MetricError(
                f"{n} {what} images but {dim} feature dimensions: the feature covariance is singular and FID is "
                f"undefined; use at least {dim} images (--n) or a feature network with fewer features"
            )
        if n <= settings.k:
            raise MetricError(f"{n} {what} images: precision/recall with k = {settings.k} need more than {settings.k}")


def _as_tensor(features: np.ndarray, what: str) -> torch.Tensor:
    if features.ndim != 2 or not np.isfinite(features).all():
        raise MetricError(f"{what} features must be a finite array [N, d], got shape {features.shape}")
    return torch.from_numpy(np.asarray(features, dtype=np.float64))


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between feature sets ``[N, d]`` and ``[M, d]`` (torchmetrics, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    r, f = _as_tensor(real, "reference"), _as_tensor(fake, "generated")
    if r.shape[1] != f.shape[1]:
        raise MetricError(f"reference features have {r.shape[1]} dimensions, generated ones {f.shape[1]}")
    metric = FrechetInceptionDistance(feature=GivenFeatures(r.shape[1]), sync_on_compute=False)
    metric.update(r, real=True)
    metric.update(f, real=False)
    return float(metric.compute())


def kid(real: np.ndarray, fake: np.ndarray, settings: MetricSettings = MetricSettings()) -> tuple[float, float]:
    """Kernel inception distance (mean, std over subsets) of feature sets (torchmetrics)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    r, f = _as_tensor(real, "reference"), _as_tensor(fake, "generated")
    size = min(settings.kid_subset_size, len(r), len(f))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=GivenFeatures(r.shape[1]), subsets=settings.kid_subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(r, real=True)
    metric.update(f, real=False)
    with _seeded(settings.seed):
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: np.ndarray, settings: MetricSettings = MetricSettings()) -> tuple[float, float]:
    """Inception-style score (mean, std over splits) from classifier logits ``[N, classes]`` (torchmetrics)."""
    from torchmetrics.image.inception import InceptionScore

    x = _as_tensor(logits, "classifier logit")
    splits = max(1, min(settings.is_splits, len(x)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=GivenFeatures(x.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(x)
    with _seeded(settings.seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # the std of a single split
        mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0


def _pairwise_single_thread(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    import sklearn.metrics

    return sklearn.metrics.pairwise_distances(x, x if y is None else y, metric="euclidean", n_jobs=1)


def prdc(real: np.ndarray, fake: np.ndarray, settings: MetricSettings = MetricSettings()) -> dict[str, float]:
    """Precision, recall, density and coverage (prdc, k-NN manifolds); the reference is subsampled to ``len(fake)``."""
    import prdc as prdc_lib
    import prdc.prdc as prdc_impl
    from threadpoolctl import threadpool_limits

    if real.shape[1] != fake.shape[1]:
        raise MetricError(f"reference features have {real.shape[1]} dimensions, generated ones {fake.shape[1]}")
    if min(len(real), len(fake)) <= settings.k:
        raise MetricError(f"precision/recall with k = {settings.k} need more than {settings.k} images per set")
    if len(real) > len(fake):
        keep = np.sort(np.random.default_rng(settings.seed).permutation(len(real))[: len(fake)])
        real = real[keep]
    # prdc asks sklearn for 8 parallel jobs and prints set sizes: run it single-threaded and quietly
    original = prdc_impl.compute_pairwise_distance
    prdc_impl.compute_pairwise_distance = _pairwise_single_thread
    try:
        with threadpool_limits(1), contextlib.redirect_stdout(io.StringIO()):
            out: dict[str, Any] = prdc_lib.compute_prdc(
                real.astype(np.float32), fake.astype(np.float32), nearest_k=settings.k
            )
    finally:
        prdc_impl.compute_pairwise_distance = original
    return {key: float(value) for key, value in out.items()}


def compute_metrics(
    real: np.ndarray,
    fake: np.ndarray,
    fake_logits: np.ndarray | None = None,
    settings: MetricSettings = MetricSettings(),
) -> dict[str, float]:
    """All metrics of generated features ``fake [M, d]`` against reference features ``real [N, d]``."""
    check_sizes(len(fake), len(real), real.shape[1], settings)
    out: dict[str, float] = {"fid": fid(real, fake)}
    if fake_logits is not None:
        out["is_mean"], out["is_std"] = inception_score(fake_logits, settings)
    out["kid_mean"], out["kid_std"] = kid(real, fake, settings)
    out.update(prdc(real, fake, settings))
    return out
