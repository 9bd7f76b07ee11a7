"""``pagkit generate``, ``pagkit compare`` and ``pagkit ui`` (click only at import: nothing heavy)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from pagkit.options import POSITIVE, SEED, progress_option
from pagkit.threads import apply_threads, threads_option

_CLASS = click.IntRange(min=0)


def _model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by generate and compare: model, conditioning, size, device."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--model",
            required=True,
            type=click.Path(),
            help="A local diffusers pipeline folder (save_pretrained) or a single-file checkpoint.",
        ),
        click.option(
            "--config",
            type=click.Path(),
            default=None,
            help="For a single-file checkpoint: a local pipeline folder of its family (configs, tokenizers).",
        ),
        click.option("--prompt", default=None, help="The prompt (text-conditioned models)."),
        click.option("--negative-prompt", default=None, help="The negative prompt (the CFG branch)."),
        click.option(
            "--class", "class_label", type=_CLASS, default=None, help="Class index (class-conditional models)."
        ),
        click.option("--steps", type=POSITIVE, default=30, show_default=True, help="Denoising steps."),
        click.option("--height", type=POSITIVE, default=None, help="Output height in pixels [default: the model's]."),
        click.option("--width", type=POSITIVE, default=None, help="Output width in pixels [default: the model's]."),
        click.option("--frames", type=POSITIVE, default=None, help="Video frames [default: the model's]."),
        click.option(
            "--device", default="auto", show_default=True, help="auto (cuda where available, else cpu), cpu, cuda:1."
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
            default="auto",
            show_default=True,
            help="auto: float16 on cuda, float32 on cpu.",
        ),
        threads_option(),
        progress_option(),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _inputs(
    prompt: str | None,
    negative_prompt: str | None,
    class_label: int | None,
    steps: int,
    height: int | None,
    width: int | None,
    frames: int | None,
) -> Any:
    from pagkit.app.run import Inputs

    return Inputs(prompt, negative_prompt, class_label, steps, height, width, frames)


@click.command("generate")
@_model_options
@click.option(
    "--guidance",
    default="pag:3",
    show_default=True,
    help="A guidance spec (pagkit guidance): cfg:4+pag:3, pag:3@mid, seg:2, none. cfg is the pipeline's own.",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="The CPU generator's seed.")
@click.option("--out", required=True, help="Output .png (.jpg/.webp) for images; .gif, .webp or .mp4 for video.")
def generate_cmd(
    model: str,
    config: str | None,
    prompt: str | None,
    negative_prompt: str | None,
    class_label: int | None,
    steps: int,
    height: int | None,
    width: int | None,
    frames: int | None,
    device: str,
    dtype: str,
    threads: str,
    no_progress: bool,
    guidance: str,
    seed: int,
    out: str,
) -> None:
    """One image or video from your own diffusers pipeline, with PAG (and CFG, SEG, ...) from a guidance spec."""
    from pagkit.app.output import check_extension

    path = check_extension(out)
    apply_threads(threads)
    from pagkit.app.generate import generate_to_file

    inputs = _inputs(prompt, negative_prompt, class_label, steps, height, width, frames)
    summary = generate_to_file(model, inputs, guidance, seed, path, device, dtype, config, progress=not no_progress)
    click.echo(f"wrote {path} ({summary['pipeline']}, {', '.join(summary['guidance'])}, {summary['seconds']:.1f} s)")


@click.command("compare")
@_model_options
@click.option(
    "--guidance",
    "settings",
    multiple=True,
    help="A guidance spec per grid row (repeatable): none, pag:3, cfg:4+pag:3.",
)
@click.option("--sweep", default=None, help="Rows from one term's scale list, e.g. pag:0,1,3,5 or cfg:4+pag:0,2,4.")
@click.option("--seeds", default="0,1,2,3", show_default=True, help="Grid columns: seeds 0,1,2 or a range 0-3.")
@click.option("--out", required=True, help="Grid .png (video: .gif/.webp animated); the JSON goes beside it.")
def compare_cmd(
    model: str,
    config: str | None,
    prompt: str | None,
    negative_prompt: str | None,
    class_label: int | None,
    steps: int,
    height: int | None,
    width: int | None,
    frames: int | None,
    device: str,
    dtype: str,
    threads: str,
    no_progress: bool,
    settings: tuple[str, ...],
    sweep: str | None,
    seeds: str,
    out: str,
) -> None:
    """The same seeds under several guidance settings: one labelled grid (rows settings, columns seeds) + JSON."""
    from pagkit.app.output import check_extension

    path = check_extension(out, (".png", ".gif", ".webp"))
    from pagkit.app.compare import expand_sweep, parse_seeds
    from pagkit.guidance.spec import parse_guidance

    specs = list(settings) + (expand_sweep(sweep) if sweep else [])
    if not specs:
        raise ValueError(
            "give --guidance SPEC (repeatable, e.g. --guidance none --guidance pag:3) or --sweep pag:0,1,3"
        )
    for text in specs:
        parse_guidance(text)
    seed_list = parse_seeds(seeds)
    apply_threads(threads)
    from pagkit.app.compare import compare_to_files

    inputs = _inputs(prompt, negative_prompt, class_label, steps, height, width, frames)
    summary = compare_to_files(model, inputs, specs, seed_list, path, device, dtype, config, progress=not no_progress)
    times = ", ".join(f"{s['guidance']} {s['seconds']:.1f} s" for s in summary["settings"])
    click.echo(f"wrote {path} and {path.with_suffix('.json')} ({times})")


@click.command("ui")
@click.option("--model", type=click.Path(), default=None, help="A local diffusers pipeline [default: embedded model].")
@click.option("--config", type=click.Path(), default=None, help="For a single-file --model: its family's folder.")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True, help="Port (0: any free).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda where available, else cpu), cpu, cuda.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    default="auto",
    show_default=True,
    help="For --model: auto is float16 on cuda, float32 on cpu.",
)
@threads_option()
@progress_option()
def ui_cmd(
    model: str | None,
    config: str | None,
    port: int,
    host: str,
    device: str,
    dtype: str,
    threads: str,
    no_progress: bool,
) -> None:
    """A local web page (Gradio; pip install 'pagkit[ui]'): unguided and guided images side by side, same seed."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ValueError("pagkit ui needs Gradio: pip install 'pagkit[ui]'")
    apply_threads(threads)
    from pagkit.app.ui import build_backend, build_page

    backend = build_backend(model, device, dtype, config)
    page = build_page(backend)
    click.echo(f"pagkit ui on http://{host}:{port} ({backend.title}); Ctrl+C stops it")
    page.queue().launch(server_name=host, server_port=port or None, show_error=True, quiet=no_progress)
