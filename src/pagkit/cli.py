"""The ``pagkit`` command line: a thin layer over the library.

Importing this module loads click and nothing heavy: torch, diffusers and numpy load inside the commands that
need them, so ``pagkit --help`` and argument errors answer at once (``tests/test_startup.py`` checks the import
graph). Every command takes ``--threads`` with one meaning (:mod:`pagkit.threads`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from pagkit.options import (
    FINITE,
    N_IMAGES,
    POSITIVE,
    POSITIVE_FLOAT,
    SEED,
    check_output,
    check_sample_size,
    check_spec,
    device_option,
    progress_option,
    threads_option,
)
from pagkit.threads import apply_threads


def _known_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input or a bad file (one line, exit 2); anything else is a bug (traceback)."""
    errors: list[type[BaseException]] = [ValueError, OSError, MemoryError]
    for module, name in (("pagkit.data", "DatasetError"), ("pagkit.weights", "WeightsError")):
        loaded = sys.modules.get(module)  # not loaded: it cannot have raised
        if loaded is not None:
            errors.append(getattr(loaded, name))
    return tuple(errors)


def _close_progress_bars() -> None:
    """End every open progress bar's line, so that an error message starts on a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        bar.close()


def error_message(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")).strip()
    if isinstance(e, MemoryError):
        return f"out of memory{': ' + text if text else ''}"
    return text or type(e).__name__


class _Group(click.Group):
    """Turns the library's known errors into one-line messages with a non-zero exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            if not isinstance(e, _known_errors()):
                raise
            _close_progress_bars()
            click.echo(f"error: {error_message(e)}", err=True)
            sys.exit(2)


_check_output = check_output  # the name other modules and tests use


@click.group(cls=_Group)
@click.version_option(package_name="pagkit", prog_name="pagkit")
def main() -> None:
    """Perturbed-Attention Guidance for diffusion models (Ahn et al., ECCV 2024)."""


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="runs/denoiser",
    show_default=True,
    help="Output folder: denoiser.safetensors, checkpoint, train_log.jsonl.",
)
@click.option("--epochs", type=POSITIVE_FLOAT, default=None, help="Training length [default: 12].")
@click.option("--batch-size", type=POSITIVE, default=None, help="Images per optimizer step [default: 128].")
@click.option("--lr", type=POSITIVE_FLOAT, default=None, help="AdamW learning rate [default: 5e-4].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initial weights and the data order.")
@threads_option()
@click.option("--max-steps", type=POSITIVE, default=None, help="Stop this call after so many steps (resume later).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.safetensors.")
@click.option("--data-dir", type=click.Path(), default=None, help="Folder of Fashion-MNIST IDX files.")
@progress_option()
def train(
    out_dir: str,
    epochs: float | None,
    batch_size: int | None,
    lr: float | None,
    seed: int,
    threads: str,
    max_steps: int | None,
    resume: bool,
    data_dir: str | None,
    no_progress: bool,
) -> None:
    """Train the embedded class-conditional denoiser on Fashion-MNIST (CPU, bf16 autocast, EMA)."""
    from dataclasses import replace

    from pagkit.train.denoiser import TrainConfig, train_denoiser

    cfg = TrainConfig(seed=seed, threads=apply_threads(threads))
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if batch_size is not None:
        cfg = replace(cfg, batch_size=batch_size)
    if lr is not None:
        cfg = replace(cfg, lr=lr)
    path = train_denoiser(
        out_dir, train=cfg, data_dir=data_dir, resume=resume, max_steps=max_steps, progress=not no_progress
    )
    click.echo(f"wrote {path}")


_LABEL = click.Choice(["none", *map(str, range(10))], case_sensitive=False)


@main.command()
@click.option("--n", "n", type=N_IMAGES, default=16, show_default=True, help="Number of images.")
@click.option("--steps", type=POSITIVE, default=None, help="Sampling steps [default: 50].")
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default=None, help="[default: ddim]")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Image i uses the generator of (seed, i).")
@click.option("--label", type=_LABEL, default="none", show_default=True, help="Class 0..9, or none.")
@click.option("--cfg-scale", type=FINITE, default=1.0, show_default=True, help="CFG scale w (1: no CFG).")
@click.option("--pag-scale", type=FINITE, default=None, help="PAG scale s (0: no PAG) [default: recommended].")
@click.option("--pag-layers", default=None, help="Layer spec, e.g. mid, down.2 [default: recommended].")
@click.option("--pag-schedule", default=None, help="constant, interval:0:0.5, linear, cosine, ...")
@click.option("--perturbation", default="identity", show_default=True, help="identity or an ablation op.")
@click.option("--reuse-delta", type=POSITIVE, default=1, show_default=True, help="Recompute PAG every k-th step.")
@click.option("--sag-scale", type=FINITE, default=0.0, show_default=True, help="SAG scale (Hong et al.; 0: no SAG).")
@click.option(
    "--guidance", default=None,
    help="A guidance spec, e.g. cfg:3+pag:2, seg:2, slg:3@mid_block, auto:1, apg:4 (pagkit guidance lists them); "
    "replaces --cfg-scale/--pag-*/--sag-*.",
)  # fmt: skip
@click.option(
    "--sag-layer", "--sag-layers", "sag_layer", default="mid", show_default=True,
    help="Layer spec whose attention map SAG reads.",
)  # fmt: skip
@click.option(
    "--batch-size",
    type=POSITIVE,
    default=64,
    show_default=True,
    help="Images per model call (bit-exact reruns need the same batch size and threads; see pagkit.generate).",
)
@click.option(
    "--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True, help="bf16: autocast."
)
@click.option("--weights", type=click.Path(), default=None, help="A denoiser .safetensors [default: embedded].")
@click.option(
    "--model",
    "model_kind",
    type=click.Choice(["embedded", "distilled"]),
    default="embedded",
    show_default=True,
    help="distilled: the PAG/CFG-distilled student, one model call per step at any --pag-scale/--cfg-scale.",
)
@click.option("--student", type=click.Path(), default=None, help="A student .safetensors [default: the shipped one].")
@device_option()
@threads_option()
@progress_option()
@click.option(
    "--out",
    required=True,
    help="Output .png (grid) or .npz (images, labels). Written as it goes in OUT.parts/: rerun to resume.",
)
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
    sag_layer: str,
    guidance: str | None,
    batch_size: int,
    precision: str,
    weights: str | None,
    model_kind: str,
    student: str | None,
    device: str,
    threads: str,
    no_progress: bool,
    out: str,
) -> None:
    """Sample Fashion-MNIST images from the embedded model, with PAG, CFG and/or SAG."""
    path = _check_output(out, (".png", ".npz"))
    check_spec(pag_layers, "--pag-layers")
    check_spec(sag_layer, "--sag-layer")
    check_sample_size(path, n)
    apply_threads(threads)

    from tqdm.auto import tqdm

    from pagkit.generate import RECOMMENDED, check_device, check_steps, generate, parse_label
    from pagkit.models.unet import default_denoiser_path, load_denoiser
    from pagkit.parts import SampleParts, file_digest, part_size

    dev = check_device(device)
    if model_kind == "distilled":
        if weights is not None:
            raise ValueError("--weights names a teacher denoiser; a student file is given with --student")
        from pagkit.distill.student import load_student, resolve_student_path

        weights = str(resolve_student_path(student))
        unet, config = load_student(weights)
    elif student is not None:
        raise ValueError("--student needs --model distilled")
    else:
        unet, config = load_denoiser(weights)
    kwargs: dict[str, Any] = {
        "steps": RECOMMENDED.steps if steps is None else steps,
        "sampler": sampler or RECOMMENDED.sampler,
        "seed": seed,
        "label": parse_label(label),
        "cfg_scale": cfg_scale,
        "pag_scale": RECOMMENDED.pag_scale if pag_scale is None else pag_scale,
        "pag_layers": RECOMMENDED.pag_layers if pag_layers is None else pag_layers,
        "pag_schedule": pag_schedule,
        "perturbation": perturbation,
        "reuse_delta": reuse_delta,
        "sag_scale": sag_scale,
        "sag_layer": sag_layer,
        "precision": precision,
    }
    if guidance is not None:
        if cfg_scale != 1.0 or pag_scale is not None or sag_scale != 0.0:
            raise ValueError("give either --guidance SPEC or --cfg-scale/--pag-scale/--sag-scale, not both")
        from pagkit.guidance.spec import parse_guidance

        kwargs["guidance"] = parse_guidance(guidance).text  # a bad spec fails before the model loads
    check_steps(kwargs["steps"], config)
    model = (unet.to(dev), config)
    settings = {**kwargs, "weights": file_digest(weights or default_denoiser_path()), "device": dev.type}
    parts = SampleParts(path, settings, n, part_size(batch_size))
    done = parts.open()
    with tqdm(total=n, initial=done, desc="sampling", unit="img", disable=no_progress, dynamic_ncols=True) as bar:
        for part in parts.parts:
            if parts.read(part) is not None:
                continue
            images, labels = generate(
                part.count, first_index=part.start, batch_size=batch_size, model=model, bar=bar, **kwargs
            )
            parts.write(part, images, labels)
    parts.finish()
    click.echo(f"wrote {path}")


@main.command()
@click.option("--weights", type=click.Path(), default=None, help="A denoiser .safetensors [default: embedded].")
@click.option(
    "--diffusers",
    "--model",
    "diffusers_path",
    type=click.Path(),
    default=None,
    help="A local diffusers model folder (a unet/ or transformer/ folder, or a pipeline folder).",
)
def layers(weights: str | None, diffusers_path: str | None) -> None:
    """List the model's self-attention layers (the ones PAG can perturb) with their resolution."""
    from pagkit.layers import list_layers
    from pagkit.models.unet import load_denoiser

    if diffusers_path is not None and Path(diffusers_path).is_file():  # a single-file checkpoint
        from pagkit.app.loading import load_pipeline
        from pagkit.integrations.diffusers import denoiser_of

        model, _ = denoiser_of(load_pipeline(diffusers_path, device="cpu", dtype="float32"))
    elif diffusers_path is not None:
        model = _load_diffusers_denoiser(Path(diffusers_path))
    else:
        model, _ = load_denoiser(weights)
    for layer in list_layers(model):
        click.echo(layer.describe())


def _load_diffusers_denoiser(path: Path) -> Any:
    """The denoiser of a local diffusers folder (never downloads: the path must exist)."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder: give a local diffusers model or pipeline folder")
    from diffusers import AutoModel

    for sub in ("unet", "transformer", "."):
        if (path / sub / "config.json").is_file():
            return AutoModel.from_pretrained(str(path / sub), local_files_only=True)
    raise ValueError(f"{path} has no config.json (nor unet/ or transformer/ with one): not a diffusers folder")


@main.command()
@click.option("--n", "n", type=click.IntRange(1, 1000), default=16, show_default=True, help="Images per panel.")
@click.option("--steps", type=POSITIVE, default=50, show_default=True, help="DDIM steps.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Both panels use the same seeds.")
@click.option("--out", default="demo.png", show_default=True, help="Output .png.")
@device_option()
@threads_option()
@progress_option()
def demo(n: int, steps: int, seed: int, out: str, device: str, threads: str, no_progress: bool) -> None:
    """Write a side-by-side PNG: unguided vs PAG samples of the embedded model, same seeds."""
    path = _check_output(out, (".png",))
    apply_threads(threads)
    from pagkit.generate import RECOMMENDED, check_device, check_steps, generate
    from pagkit.models.unet import load_denoiser
    from pagkit.viz import grid, save_png, titled

    dev = check_device(device)
    unet, config = load_denoiser()
    check_steps(steps, config)
    model = (unet.to(dev), config)
    panels, titles = [], []
    for scale in (0.0, RECOMMENDED.pag_scale):
        title = "unguided" if scale == 0 else f"PAG s={scale:g} ({RECOMMENDED.pag_layers})"
        progress = not no_progress
        images, _ = generate(n, steps=steps, seed=seed, pag_scale=scale, model=model, progress=progress, desc=title)
        panels.append(grid(images, ncols=4, scale=3))
        titles.append(title)
    save_png(titled(panels, titles), path)
    click.echo(f"wrote {path}")


@main.command("train-classifier")
@click.option("--out", default="runs/classifier.safetensors", show_default=True, help="Output .safetensors.")
@click.option("--epochs", type=POSITIVE, default=10, show_default=True, help="Training length.")
@click.option("--max-steps", type=POSITIVE, default=None, help="Stop after so many optimizer steps (a short run).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initial weights and the data order.")
@threads_option()
@click.option("--data-dir", type=click.Path(), default=None, help="Folder of Fashion-MNIST IDX files.")
@progress_option()
def train_classifier_cmd(
    out: str, epochs: int, max_steps: int | None, seed: int, threads: str, data_dir: str | None, no_progress: bool
) -> None:
    """Train the Fashion-MNIST classifier used as the metrics' feature network."""
    _check_output(out, (".safetensors",))
    from pagkit.train.classifier import ClassifierTrainConfig, train_classifier

    cfg = ClassifierTrainConfig(epochs=epochs, seed=seed, threads=apply_threads(threads))
    path, acc = train_classifier(out, train=cfg, data_dir=data_dir, max_steps=max_steps, progress=not no_progress)
    click.echo(f"wrote {path} (test accuracy {acc:.4f})")


@main.command()
@click.option("--steps", type=POSITIVE, default=4, show_default=True, help="Denoising steps per timed run.")
@click.option("--reps", type=POSITIVE, default=3, show_default=True, help="Paired repetitions (median reported).")
@click.option("--layers", default="mid", show_default=True, help="PAG layers of the U-Nets.")
@click.option("--dit-layers", default="blocks.6", show_default=True, help="PAG layers of the DiT.")
@click.option(
    "--section",
    "sections",
    type=click.Choice(["sd", "dit", "embedded", "flux", "wan"]),
    multiple=True,
    help="Sections to run (repeatable; default: all). flux and wan: random Flux-/Wan-shaped transformers.",
)
@threads_option()
@click.option("--out", default=None, help="Also write the report (Markdown) here.")
def bench(
    steps: int, reps: int, layers: str, dit_layers: str, sections: tuple[str, ...], threads: str, out: str | None
) -> None:
    """Time, FLOPs and peak memory per step: unguided, naive PAG, pagkit PAG, diffusers' PAG pipeline, CFG,
    CFG+PAG, on SD-shaped and DiT-shaped random components and on the embedded model."""
    import platform
    import warnings

    path = _check_output(out, (".md",)) if out else None
    # quiet: the profiler's start/stop lines, transformers' and diffusers' notices, pipelines' progress bars
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    apply_threads(threads)
    import torch
    from diffusers import DiffusionPipeline

    from pagkit.bench import bench_dit, bench_embedded, bench_family, bench_sd

    chosen = set(sections or ("sd", "dit", "embedded", "flux", "wan"))
    family_layers = {
        "flux": "single_transformer_blocks.2.attn",
        "wan": "blocks.2.attn1",
    }

    command = " ".join(["pagkit bench", *sys.argv[2:]])
    head = (
        f"# pagkit bench\n\nCommand: `{command}`; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}. Times are medians of {reps} paired repetitions of "
        f"{steps} steps.\n"
    )
    quiet_bars = "_progress_bar_config" not in vars(DiffusionPipeline)
    if quiet_bars:  # a class default: every pipeline without its own configuration shows no bar
        DiffusionPipeline._progress_bar_config = {"disable": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            parts = []
            if "sd" in chosen:
                sd = bench_sd(steps=steps, reps=reps, layers=layers)
                click.echo(sd)
                parts.append(f"## SD-shaped U-Net (random weights, 256x256, CFG 4, PAG 3 on {layers})\n\n{sd}\n")
            if "dit" in chosen:
                dit = bench_dit(steps=steps, reps=reps, layers=dit_layers)
                click.echo(dit)
                parts.append(
                    f"## PixArt-Sigma-shaped DiT (random weights, 12 blocks, 256 tokens, CFG 4, PAG 3 on "
                    f"{dit_layers})\n\n{dit}\n"
                )
            if "embedded" in chosen:
                emb = bench_embedded(steps=max(steps, 10), reps=reps, layers=layers)
                click.echo(emb)
                parts.append(f"## Embedded Fashion-MNIST model (batch 16, PAG 3 on {layers})\n\n{emb}\n")
            for name in ("flux", "wan"):
                if name in chosen:
                    fam = bench_family(name, family_layers[name], steps=steps, reps=reps)
                    click.echo(fam)
                    parts.append(
                        f"## {name.capitalize()}-shaped random model (one denoiser call per step, PAG 2 on "
                        f"{family_layers[name]})\n\n{fam}\n"
                    )
    finally:
        if quiet_bars:
            del DiffusionPipeline._progress_bar_config
    report = head + "\n" + "\n".join(parts)
    if path is not None:
        from pagkit.store import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_text(report))


from pagkit.eval.cli import eval_cmd  # noqa: E402

main.add_command(eval_cmd)

from pagkit.inverse.cli import restore_cmd  # noqa: E402

main.add_command(restore_cmd)


@main.command("guidance")
def guidance_cmd() -> None:
    """List the guidance methods of --guidance and pagkit eval --configs: one line each, paper and defaults."""
    from pagkit.guidance.spec import describe

    click.echo(describe())
    click.echo("\nSyntax: METHOD[:SCALE][@LAYERS][/OPTION][~SCHEDULE][%K], terms joined by +; docs/guidance.md")


from pagkit.distill.cli import distill_cmd  # noqa: E402

main.add_command(distill_cmd)


from pagkit.app.cli import compare_cmd, generate_cmd, ui_cmd  # noqa: E402

main.add_command(generate_cmd)
main.add_command(compare_cmd)
main.add_command(ui_cmd)


if __name__ == "__main__":
    main()
