""" "Training PAG" (the paper's other future-work item) as an experiment: fine-tune the denoiser with
identity-attention dropout on the PAG layers.

For a fraction ``p`` of the rows of every batch, the attention maps of ``layers`` are replaced by the identity
(pagkit's own :class:`~pagkit.interventions.attention.AttentionPerturbation`, rows marked per batch), so the
model also learns to denoise in PAG's perturbed configuration. The objective is ``pagkit train``'s (epsilon MSE,
15% label dropout). Batches are a function of (seed, step), checkpoints are resumable, and the EMA weights are
exported in the format ``pagkit eval --weights`` reads. The control is the same fine-tuning with ``p = 0``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pagkit.models.unet import NULL_CLASS, default_denoiser_path, load_denoiser
from pagkit.train.checkpoint import load_checkpoint, save_checkpoint
from pagkit.weights import save_tensors


@dataclass(frozen=True)
class DropoutConfig:
    p: float = 0.2  # share of rows with identity attention on ``layers``
    layers: str = "mid"
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 20
    ema_decay: float = 0.995
    label_dropout: float = 0.15
    seed: int = 0
    checkpoint_every: int = 50


def finetune_identity_dropout(
    out_dir: str | os.PathLike[str],
    cfg: DropoutConfig = DropoutConfig(),
    teacher_path: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune (or resume) and write ``out_dir/denoiser.safetensors`` (EMA); return its path."""
    from diffusers import DDPMScheduler

    from pagkit.data import load_split, to_model_space
    from pagkit.interventions.attention import AttentionPerturbation
    from pagkit.interventions.rows import CallRows, marked

    if not 0.0 <= cfg.p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {cfg.p}")
    out = Path(out_dir)
    model, dconfig = load_denoiser(teacher_path or default_denoiser_path())
    model.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    data = load_split("train", data_dir)
    images, labels = to_model_space(data.images, dconfig.sample_size), torch.as_tensor(data.labels)
    scheduler = DDPMScheduler(**dconfig.scheduler_config())
    ckpt, log_path = out / "checkpoint.safetensors", out / "train_log.jsonl"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "checkpoint_every")}
    step, elapsed = 0, 0.0
    if resume and ckpt.is_file():
        from pagkit.weights import load_tensors

        if load_tensors(ckpt)[1].get("settings") != json.loads(json.dumps(settings)):
            raise ValueError(f"{ckpt} was written with other settings: resume with the same ones, or a new folder")
        meta = load_checkpoint(ckpt, model, ema, opt)
        step, elapsed = int(meta["step"]), float(meta["elapsed"])
    elif resume:
        raise FileNotFoundError(f"--resume given but {ckpt} does not exist")
    elif ckpt.is_file():
        raise FileExistsError(f"{ckpt} exists: resume it, or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    stop = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)
    perturb = AttentionPerturbation(cfg.layers, "identity")
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"identity dropout p={cfg.p:g}", disable=not progress)
    with perturb.install(model, 0):
        while step < stop:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=g)
            y = labels[idx].clone()
            y[torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout] = NULL_CLASS
            t = torch.randint(0, dconfig.num_train_timesteps, (cfg.batch_size,), generator=g)
            noise = torch.randn((cfg.batch_size, *images.shape[1:]), generator=g)
            mask = torch.rand(cfg.batch_size, generator=g) < cfg.p
            xt = scheduler.add_noise(images[idx], noise, t)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
            with marked(CallRows(cfg.batch_size, {0: mask})):
                pred = model(xt, t, class_labels=y).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 1.0 - decay)
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == stop:
                now = time.perf_counter()
                elapsed += now - t0
                t0 = now
                state: dict[str, Any] = {"step": step, "elapsed": elapsed, "settings": settings}
                save_checkpoint(ckpt, model, ema, opt, state)
                save_tensors(
                    out / "denoiser.safetensors",
                    dict(ema.state_dict()),
                    {"denoiser": dconfig.to_dict(), "identity_dropout": settings, "step": step},
                )
                with open(log_path, "a") as f:
                    record = {"step": step, "seconds": round(elapsed, 1), "loss": round(sum(losses) / len(losses), 5)}
                    f.write(json.dumps(record) + "\n")
                losses.clear()
    bar.close()
    return out / "denoiser.safetensors"
