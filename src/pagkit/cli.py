"""The ``pagkit`` command line: a thin layer over the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np

from pagkit.data import DatasetError
from pagkit.weights import WeightsError


class _Group(click.Group):
    """Turns the library's known errors into one-line messages with a non-zero exit code."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (DatasetError, WeightsError, ValueError, FileNotFoundError, FileExistsError, OSError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
def main() -> None:
    """Perturbed-Attention Guidance for diffusion models (Ahn et al., ECCV 2024)."""


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/denoiser", show_default=True)
@click.option("--epochs", type=float, default=None, help="Training length in epochs [default: 12].")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, help="torch threads (0: torch's default).")
@click.option("--max-steps", type=int, default=None, help="Stop this call after so many steps (resume later).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.safetensors.")
@click.option("--data-dir", type=click.Path(), default=None, help="Folder of Fashion-MNIST IDX files.")
def train(
    out_dir: str,
    epochs: float | None,
    batch_size: int | None,
    lr: float | None,
    seed: int,
    threads: int,
    max_steps: int | None,
    resume: bool,
    data_dir: str | None,
) -> None:
    """Train the embedded class-conditional denoiser on Fashion-MNIST (CPU, bf16 autocast, EMA)."""
    from dataclasses import replace

    from pagkit.train.denoiser import TrainConfig, train_denoiser

    cfg = TrainConfig(seed=seed, threads=threads)
    overrides = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    path = train_denoiser(out_dir, train=cfg, data_dir=data_dir, resume=resume, max_steps=max_steps)
    click.echo(f"wrote {path}")


def _check_output(path: str, suffixes: tuple[str, ...]) -> Path:
    """Fail fast (before any sampling) on an output path that cannot be written."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"output {path!r} must end in {' or '.join(suffixes)}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"cannot write {path}: permission denied (choose another --out)")
    return out


def _write_samples(out: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from pagkit.viz import grid, save_png
    from pagkit.weights import atomic_write

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)

    if out.suffix.lower() == ".npz":
        atomic_write(out, write_npz)
    else:
        save_png(grid(images, ncols=min(10, len(images))), out)


_LABEL = click.Choice(["none", *map(str, range(10))], case_sensitive=False)


@main.command()
@click.option("--n", "n", type=int, default=16, show_default=True, help="Number of images.")
@click.option("--steps", type=int, default=None, help="Sampling steps [default: 50].")
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default=None, help="[default: ddim]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--label", type=_LABEL, default="none", show_default=True, help="Class 0..9, or none.")
@click.option("--cfg-scale", type=float, default=1.0, show_default=True, help="CFG scale w (1: no CFG).")
@click.option("--pag-scale", type=float, default=None, help="PAG scale s (0: no PAG) [default: recommended].")
@click.option("--pag-layers", default=None, help="Layer spec, e.g. mid, down.2 [default: recommended].")
@click.option("--pag-schedule", default=None, help="constant, interval:0:0.5, linear, cosine, ...")
@click.option("--perturbation", default="identity", show_default=True, help="identity or an ablation op.")
@click.option("--reuse-delta", type=int, default=1, show_default=True, help="Recompute PAG every k-th step.")
@click.option("--sag-scale", type=float, default=0.0, show_default=True, help="SAG scale (Hong et al.; 0: no SAG).")
@click.option("--sag-layers", default="mid", show_default=True, help="Layer spec whose attention map SAG reads.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True, help="bf16: autocast."
)
@click.option("--weights", type=click.Path(), default=None, help="A denoiser .safetensors [default: embedded].")
@click.option("--out", required=True, help="Output .png (grid) or .npz (images, labels).")
def sample(
    n: int,
    steps: int | None,
    sampler: str | None,
    seed: int,
    label: str,
    cfg_scale: float,
    pag_scale: float | None,
    pag_layers: str | None,
    pag_schedule: str | None,
    perturbation: str,
    reuse_delta: int,
    sag_scale: float,
    sag_layers: str,
    batch_size: int,
    precision: str,
    weights: str | None,
    out: str,
) -> None:
    """Sample Fashion-MNIST images from the embedded model, with PAG, CFG and/or SAG."""
    from pagkit.generate import RECOMMENDED, generate, parse_label

    path = _check_output(out, (".png", ".npz"))
    images, labels = generate(
        n,
        steps=RECOMMENDED.steps if steps is None else steps,
        sampler=sampler or RECOMMENDED.sampler,
        seed=seed,
        label=parse_label(label),
        cfg_scale=cfg_scale,
        pag_scale=RECOMMENDED.pag_scale if pag_scale is None else pag_scale,
        pag_layers=pag_layers or RECOMMENDED.pag_layers,
        pag_schedule=pag_schedule,
        perturbation=perturbation,
        reuse_delta=reuse_delta,
        sag_scale=sag_scale,
        sag_layer=sag_layers,
        batch_size=batch_size,
        precision=precision,
        weights=weights,
    )
    _write_samples(path, images, labels)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--weights", type=click.Path(), default=None, help="A denoiser .safetensors [default: embedded].")
@click.option(
    "--diffusers",
    "diffusers_path",
    type=click.Path(),
    default=None,
    help="A local diffusers model folder (a unet/ or transformer/ folder, or a pipeline folder).",
)
def layers(weights: str | None, diffusers_path: str | None) -> None:
    """List the model's self-attention layers (the ones PAG can perturb) with their resolution."""
    from pagkit.layers import list_layers
    from pagkit.models.unet import load_denoiser

    if diffusers_path is not None:
        model = _load_diffusers_denoiser(Path(diffusers_path))
    else:
        model, _ = load_denoiser(weights)
    for layer in list_layers(model):
        click.echo(layer.describe())


def _load_diffusers_denoiser(path: Path) -> object:
    """The denoiser of a local diffusers folder (never downloads: the path must exist)."""
    from diffusers import AutoModel

    if not path.is_dir():
        raise ValueError(f"{path} is not a folder: give a local diffusers model or pipeline folder")
    for sub in ("unet", "transformer", "."):
        if (path / sub / "config.json").is_file():
            return AutoModel.from_pretrained(str(path / sub), local_files_only=True)
    raise ValueError(f"{path} has no config.json (nor unet/ or transformer/ with one): not a diffusers folder")


@main.command()
@click.option("--n", "n", type=int, default=16, show_default=True, help="Images per panel.")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default="docs/demo.png", show_default=True)
def demo(n: int, steps: int, seed: int, out: str) -> None:
    """Write a side-by-side PNG: unguided vs PAG samples of the embedded model, same seeds."""
    from pagkit.generate import RECOMMENDED, generate
    from pagkit.models.unet import load_denoiser
    from pagkit.viz import grid, save_png, titled

    path = _check_output(out, (".png",))
    model = load_denoiser()
    panels, titles = [], []
    for scale in (0.0, RECOMMENDED.pag_scale):
        images, _ = generate(n, steps=steps, seed=seed, pag_scale=scale, model=model)
        panels.append(grid(images, ncols=4, scale=3))
        titles.append("unguided" if scale == 0 else f"PAG s={scale:g} ({RECOMMENDED.pag_layers})")
    save_png(titled(panels, titles), path)
    click.echo(f"wrote {path}")


@main.command("train-classifier")
@click.option("--out", default="runs/classifier.safetensors", show_default=True)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, help="torch threads (0: torch's default).")
@click.option("--data-dir", type=click.Path(), default=None, help="Folder of Fashion-MNIST IDX files.")
def train_classifier_cmd(out: str, epochs: int, seed: int, threads: int, data_dir: str | None) -> None:
    """Train the Fashion-MNIST classifier used as the metrics' feature network."""
    from pagkit.train.classifier import ClassifierTrainConfig, train_classifier

    _check_output(out, (".safetensors",))
    path, acc = train_classifier(
        out, train=ClassifierTrainConfig(epochs=epochs, seed=seed, threads=threads), data_dir=data_dir
    )
    click.echo(f"wrote {path} (test accuracy {acc:.4f})")


@main.command()
@click.option("--steps", type=int, default=4, show_default=True, help="Denoising steps per timed run.")
@click.option("--reps", type=int, default=3, show_default=True, help="Paired repetitions (median reported).")
@click.option("--layers", default="mid", show_default=True, help="PAG layers of the U-Nets.")
@click.option("--dit-layers", default="blocks.6", show_default=True, help="PAG layers of the DiT.")
@click.option("--threads", type=int, default=0, help="torch threads (0: torch's default).")
@click.option("--out", default=None, help="Also write the report (Markdown) here.")
def bench(steps: int, reps: int, layers: str, dit_layers: str, threads: int, out: str | None) -> None:
    """Time, FLOPs and peak memory per step: unguided, naive PAG, pagkit PAG, diffusers' PAG pipeline, CFG,
    CFG+PAG, on SD-shaped and DiT-shaped random components and on the embedded model."""
    import platform

    import torch

    from pagkit.bench import bench_dit, bench_embedded, bench_sd

    if threads:
        torch.set_num_threads(threads)
    path = _check_output(out, (".md",)) if out else None
    command = " ".join(["pagkit bench", *sys.argv[2:]])
    head = (
        f"# pagkit bench\n\nCommand: `{command}`; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}. Times are medians of {reps} paired repetitions of "
        f"{steps} steps.\n"
    )
    sd = bench_sd(steps=steps, reps=reps, layers=layers)
    click.echo(sd)
    dit = bench_dit(steps=steps, reps=reps, layers=dit_layers)
    click.echo(dit)
    emb = bench_embedded(steps=max(steps, 10), reps=reps, layers=layers)
    click.echo(emb)
    report = (
        f"{head}\n## SD-shaped U-Net (random weights, 256x256, CFG 4, PAG 3 on {layers})\n\n{sd}\n\n"
        f"## PixArt-Sigma-shaped DiT (random weights, 12 blocks, 256 tokens, CFG 4, PAG 3 on {dit_layers})\n\n"
        f"{dit}\n\n"
        f"## Embedded Fashion-MNIST model (batch 16, PAG 3 on {layers})\n\n{emb}\n"
    )
    if path is not None:
        from pagkit.weights import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_text(report))


from pagkit.eval.cli import eval_cmd  # noqa: E402

main.add_command(eval_cmd)

from pagkit.inverse.cli import restore_cmd  # noqa: E402

main.add_command(restore_cmd)


if __name__ == "__main__":
    main()
