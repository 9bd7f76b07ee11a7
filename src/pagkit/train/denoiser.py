"""Train the embedded class-conditional denoiser on Fashion-MNIST (epsilon prediction, EMA, label dropout)."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from pagkit.data import load_split, to_model_space
from pagkit.models.unet import NULL_CLASS, DenoiserConfig, build_unet
from pagkit.train.checkpoint import load_checkpoint, save_checkpoint
from pagkit.weights import WeightsError, save_tensors


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of ``pagkit train`` (one home for every default)."""

    epochs: float = 12.0
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.15
    bf16: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    threads: int = 0  # 0: leave torch's thread count as it is (the CLI's --threads sets it)


def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)
        for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
            eb.copy_(b)


def _batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Indices of batch ``step``: a fresh permutation per epoch, a function of (seed, epoch) only."""
    per_epoch = n // batch
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[i * batch : (i + 1) * batch]


def train_denoiser(
    out_dir: str | os.PathLike[str],
    config: DenoiserConfig = DenoiserConfig(),
    train: TrainConfig = TrainConfig(),
    data_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> Path:
    """Train (or resume) and write ``out_dir/denoiser.safetensors`` (EMA weights); return its path.

    ``out_dir`` also receives ``checkpoint.safetensors`` (every ``checkpoint_every`` steps) and
    ``train_log.jsonl`` (one line per checkpoint: step, epoch, seconds, mean loss, images/s).
    ``max_steps`` stops this call early (for tests and time-boxed sessions); resume continues.
    A call that fails before writing anything leaves no empty ``out_dir`` behind.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose another --out")
    created = not out.exists()
    try:
        return _train(out, config, train, data_dir, resume, max_steps, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _train(
    out: Path,
    config: DenoiserConfig,
    train: TrainConfig,
    data_dir: str | os.PathLike[str] | None,
    resume: bool,
    max_steps: int | None,
    progress: bool,
) -> Path:
    if train.threads:
        torch.set_num_threads(train.threads)
    data = load_split("train", data_dir)
    images = to_model_space(data.images, config.sample_size)
    labels = torch.as_tensor(data.labels)
    steps_per_epoch = len(labels) // train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {train.batch_size} exceeds the {len(labels)} training images")
    out.mkdir(parents=True, exist_ok=True)
    total_steps = math.ceil(train.epochs * steps_per_epoch)

    torch.manual_seed(train.seed)
    model = build_unet(config).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=0.0)
    scheduler = DDPMScheduler(**config.scheduler_config())
    ckpt_path = out / "checkpoint.safetensors"
    log_path = out / "train_log.jsonl"
    step, elapsed = 0, 0.0
    if resume and ckpt_path.is_file():
        meta = load_checkpoint(ckpt_path, model, ema, opt)
        same = json.loads(json.dumps([config.to_dict(), _comparable(train)]))
        if [meta.get("denoiser"), meta.get("train")] != same:
            raise ValueError(
                f"{ckpt_path} was written with another config; resume with the same options or use a new --out"
            )
        try:
            step, elapsed = int(meta["step"]), float(meta["elapsed"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{ckpt_path} has no step count in its metadata: not a pagkit checkpoint") from None
    elif resume:
        raise FileNotFoundError(f"--resume given but {ckpt_path} does not exist: drop --resume to start afresh")
    elif ckpt_path.is_file():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")

    stop = total_steps if max_steps is None else min(total_steps, step + max_steps)
    bar = tqdm(
        total=total_steps, initial=step, desc="train denoiser", unit="step", dynamic_ncols=True, disable=not progress
    )
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        while step < stop:
            idx = _batch_indices(len(labels), train.batch_size, step, train.seed)
            g = torch.Generator().manual_seed(train.seed * 1_000_003 + step)
            x0 = images[idx]
            y = labels[idx].clone()
            y[torch.rand(len(y), generator=g) < train.label_dropout] = NULL_CLASS
            t = torch.randint(0, config.num_train_timesteps, (len(y),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            xt = scheduler.add_noise(x0, noise, t)
            for group in opt.param_groups:
                group["lr"] = train.lr * min(1.0, (step + 1) / train.warmup_steps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.bf16):
                pred = model(xt, t, class_labels=y).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            opt.step()
            # EMA warm-up as in common practice: short memory early, ``ema_decay`` later
            _update_ema(ema, model, min(train.ema_decay, (1 + step) / (10 + step)))
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if step % train.checkpoint_every == 0 or step == stop:
                now = time.perf_counter()
                elapsed += now - t0
                rate = len(losses) * train.batch_size / (now - t0)
                t0 = now
                record = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 3),
                    "seconds": round(elapsed, 1),
                    "loss": round(sum(losses) / len(losses), 5),
                    "images_per_s": round(rate, 1),
                }
                losses.clear()
                meta = {
                    "step": step,
                    "elapsed": elapsed,
                    "denoiser": config.to_dict(),
                    "train": _comparable(train),
                }
                save_checkpoint(ckpt_path, model, ema, opt, meta)
                _export(out / "denoiser.safetensors", ema, config, train, step, steps_per_epoch)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
    finally:
        bar.close()
    return out / "denoiser.safetensors"


def _export(
    path: Path, ema: torch.nn.Module, config: DenoiserConfig, train: TrainConfig, step: int, per_epoch: int
) -> None:
    """Write the EMA weights with their config: the file ``pagkit sample`` loads."""
    meta: dict[str, Any] = {
        "denoiser": config.to_dict(),
        "train": _comparable(train),
        "step": step,
        "epochs": round(step / per_epoch, 3),
    }
    save_tensors(path, dict(ema.state_dict()), meta)


def _comparable(train: TrainConfig) -> dict[str, Any]:
    """Train settings that must match on resume (threads, cadence and length may change)."""
    d = asdict(train)
    for key in ("threads", "checkpoint_every", "epochs"):
        d.pop(key)
    return d
