"""``pagkit eval``: sample guidance configs and measure FID, IS, KID, precision/recall, density/coverage."""

from __future__ import annotations

import click

from pagkit.options import MAX_IMAGES, POSITIVE, SEED, device_option, progress_option, threads_option
from pagkit.threads import apply_threads

LABEL_MODES = click.Choice(["none", "uniform"])


@click.command("eval")
@click.option("--configs", required=True, help="e.g. none,pag:3,sag:0.75,cfg:2,cfg:2+pag:3 or a .toml file.")
@click.option(
    "--n",
    "--num-images",
    "n",
    type=click.IntRange(1, MAX_IMAGES),
    default=2000,
    show_default=True,
    help="Images per config (--num-images under torchrun).",
)
@click.option("--steps", type=POSITIVE, default=50, show_default=True, help="Sampling steps.")
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True, help="The sampler.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Image i uses the generator of (seed, i).")
@click.option(
    "--label-mode", type=LABEL_MODES, default="none", show_default=True, help="uniform: image i is class i%10."
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (resumable).")
@click.option("--weights", type=click.Path(), default=None, help="A denoiser .safetensors [default: embedded].")
@click.option("--reference", default=None, help="test (default), train, an .npz with 'images', or a folder.")
@click.option(
    "--data-dir", type=click.Path(), default=None, help="Folder of Fashion-MNIST IDX files (--reference test/train)."
)
@click.option("--features", default="classifier", show_default=True, help="classifier, a .safetensors, or PATH.pt.")
@click.option("--classifier", default=None, help="Classifier for IS: a .safetensors, 'classifier', or 'none'.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Sampling batch size.")
@click.option(
    "--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True, help="bf16: autocast."
)
@device_option()
@click.option("--shard-size", type=POSITIVE, default=250, show_default=True, help="Images per shard file.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="[default: ~/.cache/pagkit]")
@threads_option()
@progress_option()
def eval_cmd(
    configs: str,
    n: int,
    steps: int,
    sampler: str,
    seed: int,
    label_mode: str,
    out_dir: str,
    weights: str | None,
    reference: str | None,
    data_dir: str | None,
    features: str,
    classifier: str | None,
    batch_size: int,
    precision: str,
    device: str,
    shard_size: int,
    cache_dir: str | None,
    threads: str,
    no_progress: bool,
) -> None:
    """Evaluate guidance configs on the embedded model; resumable, and shardable with torchrun.

    \b
    pagkit eval --configs none,pag:3,sag:0.75 --n 2000 --steps 50 --out runs/eval
    torchrun --nproc_per_node 2 -m pagkit eval --configs none,pag:3 --num-images 2000 --out runs/eval
    (under torchrun write --num-images: torchrun's parser takes --n for its own --nnodes/--nproc-per-node)
    """
    from pagkit.eval.configs import parse_configs

    parsed = parse_configs(configs)  # a bad config is an error before torch loads
    apply_threads(threads)

    from pagkit.eval.report import markdown_table
    from pagkit.eval.run import EvalSettings, run_eval

    settings = EvalSettings(
        n=n,
        steps=steps,
        sampler=sampler,
        seed=seed,
        label_mode=label_mode,
        batch_size=batch_size,
        precision=precision,
        device=device,
        shard_size=shard_size,
    )
    results = run_eval(
        parsed,
        out_dir,
        settings,
        weights=weights,
        reference=reference,
        data_dir=data_dir,
        features=features,
        classifier="default" if classifier is None else classifier,
        cache_dir="default" if cache_dir is None else cache_dir,
        progress=not no_progress,
    )
    if results is not None:
        click.echo(markdown_table(results))
        click.echo(f"wrote {out_dir}/results.json, results.md, plots/ and grids/")
