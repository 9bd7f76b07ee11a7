"""Evaluation outputs: ``results.json``, a Markdown table, PNG plots (matplotlib, Agg) and sample grids."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pagkit.eval.configs import GuidanceConfig
from pagkit.viz import grid, save_png
from pagkit.weights import atomic_write

COLUMNS = (
    ("fid", "FID ↓", "{:.2f}"),
    ("is_mean", "IS ↑", "{:.2f}"),
    ("kid_mean", "KID ×1e3 ↓", "{:.2f}"),
    ("precision", "Precision ↑", "{:.3f}"),
    ("recall", "Recall ↑", "{:.3f}"),
    ("density", "Density", "{:.3f}"),
    ("coverage", "Coverage", "{:.3f}"),
    ("seconds_per_image", "s/img", "{:.3f}"),
)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per config: FID, IS, KID, precision, recall, density, coverage and sampling time."""
    s = results["settings"]
    feats = results["features"]
    head = (
        f"{s['n']} images per config, {s['sampler']} {s['steps']} steps ({s.get('precision', 'fp32')}"
        f"{'' if s.get('device', 'cpu') == 'cpu' else ', ' + results.get('sampled_on', s['device'])}), "
        f"seed {s['seed']}, "
        f"labels {s['label_mode']}; "
        f"reference {results['reference']['name']} ({results['reference']['n']} images); "
        f"features {feats['name']} (d = {feats['dim']})\n\n"
    )
    lines = ["| config | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for row in results["configs"]:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("–")
            else:
                cells.append(fmt.format(value * 1e3 if key == "kid_mean" else value))
        lines.append(f"| `{row['name']}` | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def scale_families(configs: Sequence[GuidanceConfig], rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    """``family -> [(scale, row), ...]`` sorted by scale; the unguided config joins every family at its zero."""
    families: dict[str, list] = {}
    unguided = [row for c, row in zip(configs, rows, strict=True) if not c.active]
    for c, row in zip(configs, rows, strict=True):
        fam = c.family()
        if fam is not None:
            families.setdefault(fam[0], []).append((fam[1], row))
    for name, points in families.items():
        zero = 1.0 if name == "cfg" else 0.0
        if unguided and all(x != zero for x, _ in points):
            points.append((zero, unguided[0]))
        points.sort(key=lambda p: p[0])
    return families


def plot_scales(path: Path, configs: Sequence[GuidanceConfig], rows: Sequence[dict[str, Any]]) -> None:
    """FID and IS against the guidance scale, one line per family (e.g. ``pag@mid``, ``cfg``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    families = scale_families(configs, rows)
    for name, points in families.items():
        xs = [x for x, _ in points]
        axes[0].plot(xs, [r["fid"] for _, r in points], marker="o", label=name)
        if all("is_mean" in r for _, r in points):
            axes[1].plot(xs, [r["is_mean"] for _, r in points], marker="o", label=name)
    axes[0].set(xlabel="guidance scale (CFG: w)", ylabel="FID (lower is better)", title="FID vs scale")
    axes[1].set(xlabel="guidance scale (CFG: w)", ylabel="IS (higher is better)", title="IS vs scale")
    for ax in axes:
        ax.grid(alpha=0.3)
        if families:
            ax.legend(fontsize=7)
    if not families:
        axes[0].text(0.5, 0.5, "no single-term configs to sweep", ha="center", transform=axes[0].transAxes)
    _save_figure(fig, path)
    plt.close(fig)


def plot_precision_recall(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Precision against recall, one labelled point per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for row in rows:
        ax.scatter(row["recall"], row["precision"])
        ax.annotate(
            row["name"], (row["recall"], row["precision"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set(xlabel="recall", ylabel="precision", title="precision vs recall (k = 5)", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_report(
    out: Path, results: dict[str, Any], samples: Sequence[tuple[GuidanceConfig, np.ndarray]], grid_images: int = 64
) -> None:
    """Write ``results.json``, ``results.md``, ``plots/`` and ``grids/`` under ``out``."""
    _write_text(out / "results.json", json.dumps(_jsonable(results), indent=2) + "\n")
    _write_text(out / "results.md", markdown_table(results))
    configs = [c for c, _ in samples]
    plot_scales(out / "plots" / "fid_is_vs_scale.png", configs, results["configs"])
    plot_precision_recall(out / "plots" / "precision_recall.png", results["configs"])
    for config, images in samples:
        if grid_images > 0:
            save_png(grid(images[:grid_images], ncols=8), out / "grids" / f"{config.slug()}.png")
