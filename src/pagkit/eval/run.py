"""``run_eval``: sample every guidance config in resumable shards, then measure them against a reference set.

Layout of ``out_dir``::

    run.json                      settings and configs of the latest call
    samples/<key>/shard-00000.npz images [k, 28, 28] uint8, labels, first_index, seconds, rank and a checksum
                                  of them (atomic renames); a damaged shard is renamed *.damaged and resampled
    samples/<key>/<hash>-<hash>.npz  cached features of a finished config (checksummed; recomputed if damaged)
    results.json, results.md      every number; a Markdown table
    plots/*.png, grids/*.png      FID/IS vs scale, precision vs recall; a sample grid per config

``<key>`` hashes everything that decides the images (guidance, steps, sampler, seed, labels, model weights,
shard size), so a restarted run reuses exactly the shards it finished and never mixes settings. Image i of a
config uses the generator of ``(seed, i)`` (see :func:`pagkit.generate.generate`), so the images, and hence the
metrics, do not depend on the batch size or on how many processes shared the shards.

Distributed: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set), shard s is sampled by rank ``s % WORLD_SIZE``
(gloo process group); after a barrier, rank 0 computes the metrics from all shards.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pagkit.eval.configs import GuidanceConfig
from pagkit.eval.features import ClassifierFeatures, FeatureNet, extract, load_feature_net, module_digest, probe
from pagkit.eval.metrics import MetricSettings, check_sizes, compute_metrics
from pagkit.eval.reference import check_images, data_digest, default_cache_dir, load_reference, reference_features
from pagkit.generate import RECOMMENDED, autocast_dtype, check_device, check_steps, generate
from pagkit.layers import select_layers
from pagkit.models.classifier import load_classifier
from pagkit.models.unet import DenoiserConfig, load_denoiser
from pagkit.sampling.loops import make_scheduler
from pagkit.store import DamagedFile, atomic_write, load_arrays, notice, save_arrays, set_aside

LABEL_MODES = ("none", "uniform")
OnShard = Callable[[GuidanceConfig, int, Path], None]


class EvalError(ValueError):
    """Bad evaluation settings, or an incomplete run."""


@dataclass(frozen=True)
class EvalSettings:
    """How the samples are drawn and measured (one home for every default)."""

    n: int = 2000  # images per config
    steps: int = RECOMMENDED.steps
    sampler: str = RECOMMENDED.sampler
    seed: int = 0
    label_mode: str = "none"  # none: unconditional; uniform: image i has class i % 10
    batch_size: int = 64
    shard_size: int = 250
    precision: str = "fp32"  # bf16: the model runs under bf16 autocast
    device: str = "cpu"  # where the denoiser samples (cuda: one process; features stay on the CPU)
    grid_images: int = 64
    feature_batch_size: int = 250
    metrics: MetricSettings = field(default_factory=MetricSettings)

    def check(self) -> None:
        for name in ("n", "steps", "batch_size", "shard_size", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.label_mode not in LABEL_MODES:
            raise EvalError(f"unknown label mode {self.label_mode!r}: use one of {', '.join(LABEL_MODES)}")
        make_scheduler(self.sampler, {})
        autocast_dtype(self.precision)
        try:
            check_device(self.device)
        except ValueError as e:
            raise EvalError(str(e)) from None


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    count: int

    @property
    def filename(self) -> str:
        return f"shard-{self.index:05d}.npz"


def shard_plan(n: int, shard_size: int) -> list[Shard]:
    """Shards ``[start, start + count)`` covering images ``0 .. n-1``."""
    return [Shard(i, s, min(shard_size, n - s)) for i, s in enumerate(range(0, n, shard_size))]


def image_labels(mode: str, start: int, count: int) -> np.ndarray:
    """Per-image classes: -1 (unconditional) or ``i % 10`` (balanced) for images ``start .. start+count-1``."""
    if mode == "uniform":
        return (np.arange(start, start + count) % 10).astype(np.int64)
    return np.full(count, -1, dtype=np.int64)


def distributed(device: str = "cpu") -> tuple[int, int]:
    """``(rank, world_size)``; starts a process group (gloo on CPU, NCCL on CUDA) when launched by torchrun with
    several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        # a long timeout lets ranks finish their shards at different times
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=72))
    return dist.get_rank(), dist.get_world_size()


def _finish_distributed(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def device_name(device: str) -> str:
    """``cpu`` or the accelerator's name (e.g. ``NVIDIA H100 80GB HBM3``)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return torch.device(device).type


def sample_key(config: GuidanceConfig, settings: EvalSettings, model_digest: str) -> str:
    """Hash of everything that decides a config's images."""
    decisive = {
        "guidance": config.generate_kwargs(),
        "steps": settings.steps,
        "sampler": settings.sampler,
        "seed": settings.seed,
        "label_mode": settings.label_mode,
        "model": model_digest,
        "shard_size": settings.shard_size,
    }
    if settings.precision != "fp32":  # fp32 keys stay those of runs made before the option existed
        decisive["precision"] = settings.precision
    if settings.device != "cpu":  # other devices round differently: their shards never mix with CPU ones
        decisive["device"] = torch.device(settings.device).type
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def shard_spec(count: int) -> dict[str, tuple[str, tuple[int | None, ...]]]:
    """The arrays of a shard file (besides its checksum): key -> (dtype, shape)."""
    return {
        "images": ("uint8", (count, 28, 28)),
        "labels": ("int64", (count,)),
        "first_index": ("int64", ()),
        "seconds": ("float64", ()),
        "rank": ("int64", ()),
    }


def check_shard(path: Path, shard: Shard, label_mode: str) -> dict[str, np.ndarray]:
    """A shard's arrays, checked (format, keys, dtypes, shapes, checksum, index and labels); else
    :class:`~pagkit.store.DamagedFile`."""
    arrays = load_arrays(path, shard_spec(shard.count))
    if int(arrays["first_index"]) != shard.start:
        raise DamagedFile(path, f"it holds images from {int(arrays['first_index'])}, expected {shard.start}")
    if not np.array_equal(arrays["labels"], image_labels(label_mode, shard.start, shard.count)):
        raise DamagedFile(path, f"its labels are not those of label mode {label_mode!r}")
    return arrays


def read_shard(path: Path, shard: Shard, label_mode: str = "none", repair: bool = True) -> dict[str, np.ndarray] | None:
    """A finished shard's arrays, or None when it is missing or damaged (then set aside, with a one-line
    notice, so that it is sampled again; ``repair=False`` leaves it in place)."""
    if not path.is_file():
        return None
    try:
        return check_shard(path, shard, label_mode)
    except DamagedFile as e:
        if repair:
            set_aside(path, e.reason, "shard")
        return None


@dataclass
class _Plan:
    config: GuidanceConfig
    key: str
    folder: Path
    shards: list[Shard]


class Evaluation:
    """A prepared evaluation: every input checked, nothing long started yet (see :func:`run_eval`)."""

    def __init__(
        self,
        configs: Sequence[GuidanceConfig],
        out_dir: str | os.PathLike[str],
        settings: EvalSettings = EvalSettings(),
        *,
        weights: str | os.PathLike[str] | None = None,
        model: tuple[torch.nn.Module, DenoiserConfig] | None = None,
        reference: str | os.PathLike[str] | np.ndarray | None = None,
        features: str | os.PathLike[str] | FeatureNet = "classifier",
        classifier: str | os.PathLike[str] | ClassifierFeatures | None = "default",
        cache_dir: str | os.PathLike[str] | None = "default",
        data_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        settings.check()
        self.settings = settings
        self.configs = list(configs)
        self.out = Path(out_dir)
        self.progress = progress
        self.cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
        if not self.configs:
            raise EvalError("no guidance configs to evaluate")
        for c in self.configs:
            if c.uses_cfg and settings.label_mode == "none":
                raise EvalError(f"config {c.name!r} uses CFG, which needs class labels: use --label-mode uniform")
        # the model, and every config's layer specs resolved against it
        unet, config = model if model is not None else load_denoiser(weights)
        try:
            check_steps(settings.steps, config)
        except ValueError as e:
            raise EvalError(str(e)) from None
        self.model = (unet.to(settings.device), config)
        for c in self.configs:
            try:
                if c.pag_scale != 0.0:
                    select_layers(unet, c.pag_layers)
                if c.sag_scale != 0.0:
                    select_layers(unet, c.sag_layer)
            except ValueError as e:
                raise EvalError(f"config {c.name!r}: {e}") from e
        self.model_digest = module_digest(unet)
        # the reference set and the feature networks, probed on a dummy batch
        if isinstance(reference, np.ndarray):
            self.reference, self.reference_name = check_images(reference, "reference"), "array"
        else:
            self.reference, self.reference_name = load_reference(reference, data_dir)
        self.features = features if isinstance(features, FeatureNet) else load_feature_net(features)
        self.dim = probe(self.features)
        if classifier == "default":
            classifier = self.features if isinstance(self.features, ClassifierFeatures) else "classifier"
        if classifier is None or classifier == "none":
            self.classifier = None
        elif isinstance(classifier, ClassifierFeatures):
            self.classifier = classifier
        else:
            spec = str(classifier)
            self.classifier = ClassifierFeatures(load_classifier(None if spec == "classifier" else spec))
        if self.classifier is not None:
            probe(self.classifier)
        check_sizes(settings.n, len(self.reference), self.dim, settings.metrics)
        self.plans = []
        for c in self.configs:
            key = sample_key(c, settings, self.model_digest)
            self.plans.append(_Plan(c, key, self.out / "samples" / key, shard_plan(settings.n, settings.shard_size)))

    # -- sampling -------------------------------------------------------------------------------------------

    def pending(self, rank: int = 0, world: int = 1) -> list[tuple[_Plan, Shard]]:
        """This rank's shards that are not finished yet."""
        return [
            (plan, shard)
            for plan in self.plans
            for shard in plan.shards
            if shard.index % world == rank
            and read_shard(plan.folder / shard.filename, shard, self.settings.label_mode) is None
        ]

    def sample(self, rank: int = 0, world: int = 1, on_shard: OnShard | None = None) -> int:
        """Sample this rank's unfinished shards; returns how many were written."""
        todo = self.pending(rank, world)
        bar = tqdm(
            total=sum(sh.count for _, sh in todo),
            desc=f"sampling (rank {rank}/{world})" if world > 1 else "sampling",
            unit="img",
            disable=not self.progress or rank != 0,
        )
        with bar:
            for plan, shard in todo:
                self._sample_shard(plan, shard, rank, bar, on_shard)
        return len(todo)

    def _sample_shard(self, plan: _Plan, shard: Shard, rank: int, bar: Any, on_shard: OnShard | None) -> None:
        """Sample one shard and write it (images, labels, first index, seconds, rank and their checksum)."""
        s = self.settings
        plan.folder.mkdir(parents=True, exist_ok=True)
        meta = plan.folder / "config.json"
        if not meta.is_file():
            text = json.dumps({"config": plan.config.to_dict(), "settings": self._settings_dict()}, indent=2)
            atomic_write(meta, lambda tmp: Path(tmp).write_text(text))
        bar.set_postfix_str(plan.config.name)
        labels = image_labels(s.label_mode, shard.start, shard.count)
        t0 = time.perf_counter()
        images, labels = generate(
            shard.count,
            steps=s.steps,
            sampler=s.sampler,
            seed=s.seed,
            labels=labels,
            first_index=shard.start,
            batch_size=s.batch_size,
            precision=s.precision,
            model=self.model,
            progress=False,
            on_batch=lambda start, batch: bar.update(len(batch)),
            **plan.config.generate_kwargs(),
        )
        seconds = time.perf_counter() - t0
        path = plan.folder / shard.filename
        arrays = {
            "images": images,
            "labels": labels,
            "first_index": np.int64(shard.start),
            "seconds": np.float64(seconds),
            "rank": np.int64(rank),
        }
        save_arrays(path, arrays)
        if on_shard is not None:
            on_shard(plan.config, shard.index, path)

    # -- measuring ------------------------------------------------------------------------------------------

    def load_samples(self, plan: _Plan) -> tuple[np.ndarray, np.ndarray, float]:
        """All images, labels and the total sampling seconds of a config (every shard must be finished)."""
        images, labels, seconds = [], [], 0.0
        for shard in plan.shards:
            arrays = read_shard(plan.folder / shard.filename, shard, self.settings.label_mode)
            if arrays is None:
                raise EvalError(
                    f"config {plan.config.name!r}: shard {shard.index} ({plan.folder / shard.filename}) is missing "
                    "or damaged; did a process fail? rerun the same command to finish it"
                )
            images.append(arrays["images"])
            labels.append(arrays["labels"])
            seconds += float(arrays.get("seconds", 0.0))
        return np.concatenate(images), np.concatenate(labels), seconds

    def _config_features(self, plan: _Plan, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        name = f"features-{self.features.fingerprint}"
        if self.classifier is not None:
            name += f"-{self.classifier.fingerprint}"
        path = plan.folder / f"{hashlib.sha256(name.encode()).hexdigest()[:12]}-{data_digest(images)}.npz"
        spec: dict[str, tuple[str, tuple[int | None, ...]]] = {"features": ("float32", (len(images), self.dim))}
        if self.classifier is not None:
            spec["logits"] = ("float32", (len(images), None))
        if path.is_file():
            try:
                cached = load_arrays(path, spec)
                if not all(np.isfinite(a).all() for a in cached.values()):
                    raise DamagedFile(path, "non-finite values")
                return cached["features"], cached.get("logits")
            except DamagedFile as e:
                notice(f"feature cache {path} is damaged ({e.reason}); recomputing it")
        fb = self.settings.feature_batch_size
        feats = extract(self.features, images, fb, self.progress, desc=f"features {plan.config.name}")
        logits = None
        if self.classifier is not None:
            logits = extract(self.classifier, images, fb, self.progress, desc="classifier logits", logits=True)
        arrays = {"features": feats} if logits is None else {"features": feats, "logits": logits}
        save_arrays(path, {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
        return feats, logits

    def measure(self) -> dict[str, Any]:
        """Metrics of every config (all shards must exist); writes the JSON, Markdown, plots and grids."""
        from pagkit.eval.report import write_report

        real, cache = reference_features(
            self.reference, self.features, self.cache_dir, self.settings.feature_batch_size, self.progress
        )
        rows = []
        for plan in tqdm(self.plans, desc="metrics", unit="config", disable=not self.progress):
            images, _, seconds = self.load_samples(plan)
            fake, logits = self._config_features(plan, images)
            row: dict[str, Any] = {"name": plan.config.name, "key": plan.key, "n": len(images)}
            row.update(compute_metrics(real, fake, logits, self.settings.metrics))
            row["sample_seconds"] = seconds
            row["seconds_per_image"] = seconds / len(images)
            row["config"] = plan.config.to_dict()
            rows.append((plan.config, row, images))
        results = {
            "settings": self._settings_dict(),
            "model_digest": self.model_digest,
            "sampled_on": device_name(self.settings.device),
            "reference": {"name": self.reference_name, "n": len(self.reference), "digest": data_digest(self.reference)},
            "features": {"name": self.features.name, "fingerprint": self.features.fingerprint, "dim": self.dim},
            "is_classifier": None if self.classifier is None else self.classifier.fingerprint,
            "reference_cache": None if cache is None else str(cache),
            "configs": [row for _, row, _ in rows],
        }
        write_report(self.out, results, [(c, images) for c, _, images in rows], self.settings.grid_images)
        return results

    def _settings_dict(self) -> dict[str, Any]:
        return asdict(self.settings)

    def write_manifest(self) -> None:
        text = json.dumps({"settings": self._settings_dict(), "configs": [c.to_dict() for c in self.configs]}, indent=2)
        atomic_write(self.out / "run.json", lambda tmp: Path(tmp).write_text(text))


def run_eval(
    configs: Sequence[GuidanceConfig],
    out_dir: str | os.PathLike[str],
    settings: EvalSettings = EvalSettings(),
    *,
    on_shard: OnShard | None = None,
    **inputs: Any,
) -> dict[str, Any] | None:
    """Check all inputs, sample every config's unfinished shards (this rank's share), then on rank 0 compute
    and write the metrics. Returns the results dict on rank 0 and None on other ranks.

    ``inputs``: ``weights``/``model``, ``reference``, ``features``, ``classifier``, ``cache_dir``, ``progress``
    (see :class:`Evaluation`).
    """
    rank, world = distributed(settings.device)
    if world > 1 and settings.device == "cuda":  # one GPU per process
        settings = replace(settings, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    evaluation = Evaluation(configs, out_dir, settings, **inputs)
    if rank == 0:
        evaluation.write_manifest()
    evaluation.sample(rank, world, on_shard)
    _finish_distributed(world)
    if rank != 0:
        return None
    return evaluation.measure()
