"""The ``pagkit`` command line: a thin layer over the library."""

from __future__ import annotations

import sys

import click

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


if __name__ == "__main__":
    main()
