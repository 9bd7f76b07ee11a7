"""``pagkit distill``: fine-tune a student so that one pass predicts the teacher's PAG (and CFG+PAG) guided noise.

Each step draws a global batch from (seed, step) alone: real Fashion-MNIST images, timesteps uniform in
[0, T), Gaussian noise, and per row a PAG scale s (uniform in [0, pag_max], exactly 0 a tenth of the time) and,
for the conditional rows, a CFG weight w (uniform in [1, cfg_max], exactly 1 a third of the time). A share of the
rows is unconditional (the null class, w = 1). The teacher (the denoiser with PAG on its layers) runs through
pagkit's guidance engine with prefix sharing on, in fp32, and its branches are combined per row:

    target = eps_c + (w - 1)(eps_c - eps_u) + s (eps_c - eps_perturbed)

The student (:class:`~pagkit.distill.student.StudentUNet`) sees ``(x_t, t, y, s, w)`` and is trained on the MSE to
that target, like ``pagkit train``: AdamW (the scale embedding at its own, higher learning rate), warm-up, gradient
clipping, EMA, optional bf16 autocast, resumable checkpoints (``runs/.../checkpoint.safetensors`` and its optimizer
file), a progress bar and a jsonl log. With torchrun each process takes its slice of the same global batch and
DDP averages the gradients, so K processes make the updates of one (within float rounding).

A SIGTERM or Ctrl-C writes a checkpoint of the current step before the run stops, so a resume loses nothing.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pagkit.distill.student import StudentConfig, StudentUNet, build_student, save_student
from pagkit.models.unet import NULL_CLASS, default_denoiser_path, load_denoiser
from pagkit.train.checkpoint import load_checkpoint, save_checkpoint
from pagkit.weights import WeightsError


@dataclass(frozen=True)
class DistillConfig:
    """Settings of ``pagkit distill`` (one home for every default)."""

    steps: int = 4000
    batch_size: int = 32  # the global batch (split among torchrun's processes)
    lr: float = 1e-4  # the U-Net
    guidance_lr: float = 1e-3  # the scale embedding
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    uncond_fraction: float = 0.3
    pag_zero_fraction: float = 0.1
    cfg_one_fraction: float = 0.33
    loss: str = "mse"  # "mse", or "relative": each row's error in units of its own guidance change (see row_loss)
    bf16: bool = True
    seed: int = 0
    checkpoint_every: int = 50
    threads: int = 0

    def check(self) -> None:
        for name in ("uncond_fraction", "pag_zero_fraction", "cfg_one_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch size and checkpoint interval must be >= 1")


LOSSES = ("mse", "relative")


def row_loss(pred: torch.Tensor, target: torch.Tensor, plain: torch.Tensor, kind: str) -> torch.Tensor:
    """The distillation loss. ``mse``: the mean squared error over all rows, which weighs a row by the size of
    its guidance change, so small scales (whose targets differ little from the unguided eps) are learned last.
    ``relative``: each row's squared error divided by its own squared guidance change ``target - plain`` plus a
    floor (a tenth of the batch's median change over guided rows), weights normalised to mean 1. It asks for
    the same *relative* accuracy at s = 0.5 as at s = 5, and anchors the s = 0 rows (change 0) hardest."""
    err = (pred.float() - target).pow(2).flatten(1).mean(1)
    if kind == "mse":
        return err.mean()
    change = (target - plain).pow(2).flatten(1).mean(1)
    guided = change[change > 0]
    floor = 0.1 * (guided.median() if guided.numel() else err.detach().mean()).clamp_min(1e-12)
    weight = 1.0 / (change + floor)
    return (err * (weight / weight.mean())).mean()


@dataclass
class Batch:
    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    w: torch.Tensor

    def rows(self, sl: slice) -> Batch:
        return Batch(*(getattr(self, f)[sl] for f in ("x0", "t", "noise", "y", "s", "w")))


def draw_batch(
    images: torch.Tensor, labels: torch.Tensor, step: int, cfg: DistillConfig, student: StudentConfig, timesteps: int
) -> Batch:
    """The global batch of ``step``: a function of (seed, step) only (resume and DDP draw the same rows)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    b = cfg.batch_size
    idx = torch.randint(0, len(labels), (b,), generator=g)
    t = torch.randint(0, timesteps, (b,), generator=g)
    noise = torch.randn((b, *images.shape[1:]), generator=g)
    y = labels[idx].clone()
    uncond = torch.rand(b, generator=g) < cfg.uncond_fraction
    y[uncond] = NULL_CLASS
    s = torch.rand(b, generator=g) * student.pag_max
    s[torch.rand(b, generator=g) < cfg.pag_zero_fraction] = 0.0
    w = 1.0 + torch.rand(b, generator=g) * (student.cfg_max - 1.0)
    w[torch.rand(b, generator=g) < cfg.cfg_one_fraction] = 1.0
    w[uncond] = 1.0
    return Batch(images[idx], t, noise, y, s, w)


@torch.no_grad()
def teacher_targets(
    teacher: torch.nn.Module, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor, s: torch.Tensor, w: torch.Tensor,
    layers: str, perturbation: str = "identity",
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The teacher's guided eps per row, and its unguided eps (fp32), through pagkit's engine (prefix sharing on).

    Rows with ``w != 1`` run CFG + PAG (cond, uncond and perturbed branches in one batched call); the others PAG
    only (cond and perturbed). The engine's branch predictions are combined with each row's own scales."""
    from pagkit.guidance.engine import GuidedDenoiser
    from pagkit.guidance.terms import CFG, PAG

    target = torch.empty_like(xt)
    plain = torch.empty_like(xt)
    cfg_rows = w != 1.0
    for rows, with_cfg in ((cfg_rows, True), (~cfg_rows, False)):
        if not bool(rows.any()):
            continue
        yr = y[rows]
        terms = [CFG(2.0), PAG.make(1.0, layers, perturbation)] if with_cfg else [PAG.make(1.0, layers, perturbation)]
        engine = GuidedDenoiser(
            teacher, {"class_labels": yr}, {"class_labels": torch.full_like(yr, NULL_CLASS)}, terms, prefix_sharing=True
        )
        preds = engine.predictions(xt[rows], t[rows])
        eps_c = preds["cond"]
        eps_p = preds[f"{len(terms) - 1}:perturbed"]
        out = eps_c + s[rows, None, None, None] * (eps_c - eps_p)
        if with_cfg:
            out = out + (w[rows, None, None, None] - 1.0) * (eps_c - preds["uncond"])
        target[rows] = out
        plain[rows] = eps_c
    return target, plain


def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


RESUMABLE_CHANGES = ("threads", "checkpoint_every", "steps", "lr", "guidance_lr")


def _comparable(cfg: DistillConfig) -> dict[str, Any]:
    """Settings that must match on resume (threads, cadence, length and learning rates may change: the log
    records the learning rates of every stretch)."""
    d = asdict(cfg)
    for key in RESUMABLE_CHANGES:
        d.pop(key)
    return d


def _mismatch(stored: Any, now: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The keys of ``now`` whose value differs from the checkpoint's (a key the checkpoint predates counts as
    its default; keys that may change on resume are not compared)."""
    stored = stored if isinstance(stored, dict) else {}
    return [k for k, v in now.items() if stored.get(k, defaults.get(k)) != v]


class _Stop:
    """SIGTERM/SIGINT set a flag; the loop checkpoints the current step and stops."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size()


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal after writing a checkpoint of ``step``."""

    def __init__(self, step: int, path: Path) -> None:
        super().__init__(f"stopped at step {step}; checkpoint {path} written: rerun with --resume to continue")
        self.step = step


def distill(
    out_dir: str | os.PathLike[str],
    cfg: DistillConfig = DistillConfig(),
    student_cfg: StudentConfig = StudentConfig(),
    teacher_path: str | os.PathLike[str] | None = None,
    init_path: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Path:
    """Distil (or resume) and write ``out_dir/student.safetensors`` (the EMA student); return its path.

    ``out_dir`` also receives ``checkpoint.safetensors`` + ``checkpoint-optimizer.safetensors`` (every
    ``checkpoint_every`` steps, and when stopped by a signal), ``train_log.jsonl`` (one line per checkpoint) and
    ``config.json``. ``init_path`` starts the student's U-Net from other weights (default: the teacher's); its
    architecture must equal the teacher's. ``max_steps`` stops this call early; ``resume`` continues exactly."""
    from pagkit.data import load_split, to_model_space
    from pagkit.parts import file_digest

    cfg.check()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(device)
    if dev.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = _distributed(dev)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    tpath = Path(teacher_path) if teacher_path is not None else default_denoiser_path()
    teacher, dconfig = load_denoiser(tpath)
    student_cfg = StudentConfig(**{**student_cfg.to_dict(), "teacher": file_digest(tpath)})
    from pagkit.layers import select_layers

    select_layers(teacher, student_cfg.pag_layers)  # a one-line error for a bad layer spec
    init = teacher
    init_student: StudentUNet | None = None
    if init_path is not None:
        from pagkit.distill.student import is_student_file, load_student

        if is_student_file(init_path):  # continue a student (U-Net and scale embedding) under new settings
            init_student, iconfig = load_student(init_path)
            init = init_student.unet
            scales = (init_student.config.pag_max, init_student.config.cfg_max, init_student.config.pag_layers)
            if scales != (student_cfg.pag_max, student_cfg.cfg_max, student_cfg.pag_layers):
                raise ValueError(
                    f"{init_path} is a student of PAG scales [0, {scales[0]:g}], CFG [1, {scales[1]:g}] on "
                    f"{scales[2]!r}; this run asks for [0, {student_cfg.pag_max:g}], [1, {student_cfg.cfg_max:g}] "
                    f"on {student_cfg.pag_layers!r}: use the same ranges and layers to continue it"
                )
        else:
            init, iconfig = load_denoiser(init_path)
        if iconfig != dconfig:
            raise ValueError(
                f"teacher/student architecture mismatch: {init_path} is a {iconfig.block_out_channels} U-Net "
                f"({iconfig.to_dict()}), the teacher {tpath} a {dconfig.block_out_channels} one: distil into a "
                "copy of the teacher's architecture"
            )
    data = load_split("train", data_dir)
    images = to_model_space(data.images, dconfig.sample_size)
    labels = torch.as_tensor(data.labels)

    torch.manual_seed(cfg.seed)
    student = build_student(init, student_cfg).to(dev)
    if init_student is not None:
        student.guidance.load_state_dict(init_student.guidance.state_dict())
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    teacher = teacher.to(dev)
    groups = [
        {"params": list(student.unet.parameters()), "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": list(student.guidance.parameters()), "lr": cfg.guidance_lr, "base_lr": cfg.guidance_lr},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**dconfig.scheduler_config())
    ckpt = out / "checkpoint.safetensors"
    log_path = out / "train_log.jsonl"
    meta_now = {"denoiser": dconfig.to_dict(), "student": student_cfg.to_dict(), "distill": _comparable(cfg)}
    step, elapsed, cpu = 0, 0.0, 0.0
    if resume and ckpt.is_file():
        from pagkit.weights import load_tensors

        meta = load_tensors(ckpt)[1]  # settings first: a mismatch is named before any tensor is loaded
        same = json.loads(json.dumps(meta_now))
        defaults = {
            "denoiser": {},
            "student": StudentConfig().to_dict(),
            "distill": _comparable(DistillConfig()),
        }
        for key in ("denoiser", "student", "distill"):
            bad = _mismatch(meta.get(key), same[key], defaults[key])
            if bad:
                what = {"denoiser": "teacher architecture", "student": "student/teacher", "distill": "settings"}[key]
                previous = (meta or {}).get(key)
                old: dict[str, Any] = previous if isinstance(previous, dict) else {}
                diff = ", ".join(f"{k}: {old.get(k)!r} != {same[key][k]!r}" for k in bad)
                raise ValueError(
                    f"{ckpt} was written with another {what} ({diff}); "
                    "resume with the same options and teacher, or use a new --out"
                )
        meta = load_checkpoint(ckpt, student, ema, opt)
        try:
            step, elapsed, cpu = int(meta["step"]), float(meta["elapsed"]), float(meta.get("cpu_seconds", 0.0))
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{ckpt} has no step count in its metadata: not a pagkit checkpoint") from None
    elif resume:
        raise FileNotFoundError(f"--resume given but {ckpt} does not exist: drop --resume to start afresh")
    elif ckpt.is_file():
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or choose another --out")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(
            json.dumps({**meta_now, "steps": cfg.steps, "lr": cfg.lr, "guidance_lr": cfg.guidance_lr}, indent=2) + "\n"
        )

    model: torch.nn.Module = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None)
    local = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    stop_at = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="distill",
        unit="step",
        dynamic_ncols=True,
        disable=not progress or rank != 0,
    )
    losses: list[float] = []
    baselines: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    teacher_time = 0.0

    def checkpoint() -> None:
        nonlocal elapsed, cpu, t0, c0, teacher_time
        now, cnow = time.perf_counter(), time.process_time()
        span = now - t0
        elapsed += span
        cpu += cnow - c0
        if rank == 0 and losses:
            record = {
                "step": step,
                "seconds": round(elapsed, 1),
                "cpu_seconds": round(cpu, 1),
                "loss": round(sum(losses) / len(losses), 5),
                "loss_unguided": round(sum(baselines) / len(baselines), 5),
                "images_per_s": round(len(losses) * cfg.batch_size / max(span, 1e-9), 2),
                "teacher_share": round(teacher_time / max(span, 1e-9), 3),
                "lr": cfg.lr,
                "guidance_lr": cfg.guidance_lr,
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        losses.clear()
        baselines.clear()
        teacher_time = 0.0
        if rank == 0:
            meta = {**meta_now, "step": step, "elapsed": elapsed, "cpu_seconds": cpu}
            save_checkpoint(ckpt, student, ema, opt, meta)
            save_student(out / "student.safetensors", ema, dconfig, {"step": step})
        t0, c0 = time.perf_counter(), time.process_time()

    try:
        with _Stop() as stop:
            while step < stop_at:
                batch = draw_batch(images, labels, step, cfg, student_cfg, dconfig.num_train_timesteps).rows(local)
                batch = Batch(*(getattr(batch, f).to(dev) for f in ("x0", "t", "noise", "y", "s", "w")))
                xt = scheduler.add_noise(batch.x0, batch.noise, batch.t)
                tt = time.perf_counter()
                target, plain = teacher_targets(
                    teacher, xt, batch.t, batch.y, batch.s, batch.w, student_cfg.pag_layers, student_cfg.perturbation
                )
                teacher_time += time.perf_counter() - tt
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * min(1.0, (step + 1) / cfg.warmup_steps)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    pred = model(xt, batch.t, batch.y, batch.s, batch.w)
                loss = row_loss(pred, target, plain, cfg.loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                opt.step()
                _update_ema(ema, student, min(cfg.ema_decay, (1 + step) / (10 + step)))
                step += 1
                losses.append(loss.item())
                baselines.append(row_loss(plain, target, plain, cfg.loss).item())
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
                halt = stop.requested
                if world > 1:
                    import torch.distributed as dist

                    flag = torch.tensor([float(halt)], device=dev)
                    dist.all_reduce(flag)
                    halt = bool(flag.item() > 0)
                if step % cfg.checkpoint_every == 0 or step == stop_at or halt:
                    checkpoint()
                if halt:
                    raise Interrupted(step, ckpt)
    finally:
        bar.close()
    return out / "student.safetensors"


def export_student(checkpoint_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy a run's EMA student (``student.safetensors``) to ``dest``, checked on the way."""
    from pagkit.distill.student import load_student

    src = Path(checkpoint_dir) / "student.safetensors"
    student, config = load_student(src)
    from pagkit.weights import load_tensors

    _, meta = load_tensors(src)
    save_student(dest, student, config, {k: v for k, v in meta.items() if k not in ("denoiser", "student")})
    return Path(dest)


def steps_for_hours(hours: float, seconds_per_step: float) -> int:
    return max(1, math.floor(hours * 3600 / seconds_per_step))


__all__ = ["Batch", "DistillConfig", "Interrupted", "StudentUNet", "distill", "draw_batch", "teacher_targets"]
