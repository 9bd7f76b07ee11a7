"""``pagkit restore``: DPS (+ PAG) restorations of the first N Fashion-MNIST test images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pagkit.options import (
    FINITE,
    POSITIVE,
    SEED,
    check_output,
    check_spec,
    device_option,
    progress_option,
    threads_option,
)
from pagkit.threads import apply_threads

if TYPE_CHECKING:
    import numpy as np

# the tasks registered in pagkit.inverse.operators (a test keeps this list equal to TASKS, so that the command
# line checks --task without importing torch)
TASK_NAMES = ("deblur", "inpaint", "sr4")


def restoration_grid(measured: np.ndarray, restored: np.ndarray, targets: np.ndarray, ncols: int = 16) -> np.ndarray:
    """uint8 figure: per group of ``ncols`` images, three rows (measurement | restoration | truth)."""
    import numpy as np

    from pagkit.viz import grid

    blocks = []
    for start in range(0, len(restored), ncols):
        part = [a[start : start + ncols] for a in (measured, restored, targets)]
        pad = ncols - len(part[0]) if len(restored) > ncols else 0
        if pad:
            part = [np.concatenate([p, np.full((pad, *p.shape[1:]), 255, np.uint8)]) for p in part]
        blocks.append(grid(np.concatenate(part), ncols=len(part[0]), scale=3))
    gap = np.full((8, blocks[0].shape[1]), 255, np.uint8)
    return np.concatenate([b for block in blocks for b in (block, gap)][:-1])


def write_restorations(out: Path, arrays: dict[str, Any]) -> None:
    """Write the ``.npz`` (images, targets, measurements, labels) or the PNG figure, atomically."""
    import numpy as np

    from pagkit.store import atomic_write
    from pagkit.viz import save_png

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    if out.suffix.lower() == ".npz":
        atomic_write(out, write_npz)
    else:
        save_png(restoration_grid(arrays["measurements"], arrays["images"], arrays["targets"]), out)


@click.command("restore")
@click.option("--task", type=click.Choice(TASK_NAMES), required=True, help="The measurement operator.")
@click.option("--n", "n", type=POSITIVE, default=16, show_default=True, help="Restore the first N test images.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Sampling and measurement noise seed.")
@click.option("--pag-scale", type=FINITE, default=None, help="PAG scale s (0: plain DPS) [default: 5].")
@click.option("--pag-layers", default=None, help="Layer spec of the perturbed layers [default: mid].")
@click.option("--steps", type=POSITIVE, default=None, help="Sampling steps [default: 50].")
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default=None, help="The sampler [default: ddpm].")
@click.option("--zeta", type=FINITE, default=None, help="DPS step size [default: 3.0].")
@click.option("--noise-sigma", type=FINITE, default=None, help="Measurement noise std on [-1, 1] [default: 0.05].")
@click.option("--batch-size", type=POSITIVE, default=None, help="Images per model call [default: 32].")
@click.option("--weights", type=click.Path(), default=None, help="A denoiser .safetensors [default: embedded].")
@click.option("--data-dir", type=click.Path(), default=None, help="Folder of Fashion-MNIST IDX files.")
@device_option()
@threads_option()
@progress_option()
@click.option("--out", required=True, help="Output .png (measurement | restoration | truth rows) or .npz.")
def restore_cmd(
    task: str,
    n: int,
    seed: int,
    pag_scale: float | None,
    pag_layers: str | None,
    steps: int | None,
    sampler: str | None,
    zeta: float | None,
    noise_sigma: float | None,
    batch_size: int | None,
    weights: str | None,
    data_dir: str | None,
    device: str,
    threads: str,
    no_progress: bool,
    out: str,
) -> None:
    """Restore Fashion-MNIST test images from inpainting, 4x SR or deblur measurements with DPS (+ PAG).

    The PAG-guided estimate drives each step; the measurement gradient comes from the unguided estimate.
    """
    path = check_output(out, (".png", ".npz"))
    check_spec(pag_layers, "--pag-layers")
    apply_threads(threads)

    from pagkit.data import load_split
    from pagkit.generate import check_device, check_steps
    from pagkit.inverse.operators import make_operator
    from pagkit.inverse.restore import RESTORE, measure, measurement_images, restore
    from pagkit.models.unet import load_denoiser

    dev = check_device(device)
    operator = make_operator(task)
    data = load_split("test", data_dir)
    if n > len(data):
        raise ValueError(f"--n {n} exceeds the {len(data)} test images")
    targets, labels = data.images[:n], data.labels[:n]
    sigma = RESTORE.noise_sigma if noise_sigma is None else noise_sigma
    y = measure(targets, operator, sigma, seed)
    unet, config = load_denoiser(weights)
    n_steps = RESTORE.steps if steps is None else steps
    check_steps(n_steps, config)
    images = restore(
        y,
        operator,
        steps=n_steps,
        sampler=sampler or RESTORE.sampler,
        zeta=RESTORE.zeta if zeta is None else zeta,
        pag_scale=RESTORE.pag_scale if pag_scale is None else pag_scale,
        pag_layers=pag_layers or RESTORE.pag_layers,
        seed=seed,
        batch_size=batch_size or RESTORE.batch_size,
        model=(unet.to(dev), config),
        progress=not no_progress,
    )
    arrays = {"images": images, "targets": targets, "measurements": measurement_images(operator, y), "labels": labels}
    write_restorations(path, arrays)
    click.echo(f"wrote {path}")
