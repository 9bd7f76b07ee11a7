"""``pagkit distill``: the command (click only at import; torch loads when it runs)."""

from __future__ import annotations

import click

from pagkit.options import FINITE, POSITIVE, POSITIVE_FLOAT, SEED, device_option, progress_option, threads_option
from pagkit.threads import apply_threads


@click.command("distill")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="runs/distill",
    show_default=True,
    help="Output folder: student.safetensors, checkpoint (+ optimizer file), train_log.jsonl, config.json.",
)
@click.option("--steps", type=POSITIVE, default=None, help="Total optimizer steps of the run [default: 4000].")
@click.option("--batch-size", type=POSITIVE, default=None, help="Global batch (all processes) [default: 32].")
@click.option("--lr", type=POSITIVE_FLOAT, default=None, help="AdamW learning rate of the U-Net [default: 1e-4].")
@click.option("--guidance-lr", type=POSITIVE_FLOAT, default=None, help="Of the scale embedding [default: 1e-3].")
@click.option("--pag-max", type=POSITIVE_FLOAT, default=None, help="PAG scales trained: [0, PAG_MAX] [default: 5].")
@click.option("--cfg-max", type=FINITE, default=None, help="CFG weights trained: [1, CFG_MAX] [default: 3].")
@click.option("--pag-layers", default=None, help="The teacher's PAG layers [default: mid, the recommended].")
@click.option("--teacher", type=click.Path(), default=None, help="Teacher denoiser .safetensors [default: embedded].")
@click.option(
    "--init",
    "init_path",
    type=click.Path(),
    default=None,
    help="Student start: a denoiser, or a student file to continue under new settings [default: the teacher].",
)
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="The student's forward/backward under bf16 autocast, or fp32 (faster on CPUs without "
                   "AVX512-BF16); the teacher's targets are always fp32.")  # fmt: skip
@click.option(
    "--pag-zero-fraction",
    type=click.FloatRange(0, 1),
    default=None,
    help="Share of rows with s = 0 (anchors the unguided prediction) [default: 0.1].",
)
@click.option(
    "--uncond-fraction",
    type=click.FloatRange(0, 1),
    default=None,
    help="Share of unconditional (null-class) rows [default: 0.3].",
)
@click.option(
    "--loss",
    type=click.Choice(["mse", "relative"]),
    default=None,
    help="mse, or relative: each row's error in units of its own guidance change (small scales learned as well "
    "as large ones) [default: mse].",
)
@click.option("--checkpoint-every", type=POSITIVE, default=None, help="Steps between checkpoints [default: 50].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the batches and scales drawn.")
@device_option()
@threads_option()
@click.option("--max-steps", type=POSITIVE, default=None, help="Stop this call after so many steps (resume later).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.safetensors.")
@click.option("--data-dir", type=click.Path(), default=None, help="Folder of Fashion-MNIST IDX files.")
@progress_option()
def distill_cmd(
    out_dir: str,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    guidance_lr: float | None,
    pag_max: float | None,
    cfg_max: float | None,
    pag_layers: str | None,
    teacher: str | None,
    init_path: str | None,
    precision: str,
    pag_zero_fraction: float | None,
    uncond_fraction: float | None,
    loss: str | None,
    checkpoint_every: int | None,
    seed: int,
    device: str,
    threads: str,
    max_steps: int | None,
    resume: bool,
    data_dir: str | None,
    no_progress: bool,
) -> None:
    """Distil PAG (and CFG+PAG) into a student that predicts the guided noise in one forward pass.

    The teacher is the denoiser with PAG on its recommended layers, run through pagkit's guidance engine; the
    student is a copy of it with the scales s and w as extra inputs. Runs under torchrun (DDP, gloo on CPU).
    Ctrl-C or SIGTERM writes a checkpoint first; rerun with --resume to continue."""
    from dataclasses import replace

    from pagkit.distill.student import StudentConfig
    from pagkit.distill.train import DistillConfig, Interrupted, distill
    from pagkit.generate import check_device

    cfg = DistillConfig(seed=seed, threads=apply_threads(threads) or 0, bf16=precision == "bf16")
    values: tuple[tuple[str, float | None], ...] = (
        ("steps", steps),
        ("batch_size", batch_size),
        ("lr", lr),
        ("guidance_lr", guidance_lr),
        ("checkpoint_every", checkpoint_every),
        ("pag_zero_fraction", pag_zero_fraction),
        ("uncond_fraction", uncond_fraction),
    )
    for name, value in values:
        if value is not None:
            cfg = replace(cfg, **{name: value})  # type: ignore[arg-type]
    if loss is not None:
        cfg = replace(cfg, loss=loss)
    scfg = StudentConfig()
    if pag_max is not None:
        scfg = replace(scfg, pag_max=pag_max)
    if cfg_max is not None:
        if cfg_max < 1.0:
            raise click.BadParameter("must be >= 1 (w = 1 is no CFG)", param_hint="--cfg-max")
        scfg = replace(scfg, cfg_max=cfg_max)
    if pag_layers is not None:
        scfg = replace(scfg, pag_layers=pag_layers)
    try:
        path = distill(
            out_dir,
            cfg,
            scfg,
            teacher_path=teacher,
            init_path=init_path,
            data_dir=data_dir,
            resume=resume,
            max_steps=max_steps,
            progress=not no_progress,
            device=check_device(device),
        )
    except Interrupted as e:
        click.echo(str(e), err=True)
        raise SystemExit(130) from None
    click.echo(f"wrote {path}")
