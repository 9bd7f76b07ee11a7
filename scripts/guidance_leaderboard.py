"""The guidance leaderboard on the embedded model (issue 12): every method through ``pagkit eval``, side by side.

Sections (each one ``pagkit eval`` run, resumable: rerun the same command to continue):

- ``uncond-ddimS`` (S in --steps, default 20 and 50): none, PAG, SoftPAG, head-PAG, SEG, SLG (SD3.5's window and
  the whole run), TPG, SAG, autoguidance, PAG + autoguidance, each over a scale sweep;
- ``cond-ddimS`` (class labels i % 10): CFG, APG, CFG-Zero*, CFG++, CFG + guidance interval, each with and
  without PAG, over a scale sweep.

Then, per section, each method's best scale (lowest FID) goes into a table with FID, IS, precision, recall,
density, coverage, model evaluations per step (rows the guided model call computes per image, averaged over the
run's steps: schedules and windows count), compute per step relative to unguided sampling (FLOPs of the guided
call, torch's FlopCounterMode, averaged over the steps; a weak model counts its own FLOPs) and seconds per image;
a plot of FID against compute; a same-seed grid of the best configs side by side. Output:
``OUT/leaderboard.json``, ``OUT/leaderboard.md``, ``OUT/fid_vs_compute.png``, ``OUT/grids_<section>.png``.

    .venv/bin/python scripts/guidance_leaderboard.py                                   # the full run (2,000 images)
    .venv/bin/python scripts/guidance_leaderboard.py --device cuda --batch-size 1000   # on a GPU
    .venv/bin/python scripts/guidance_leaderboard.py --num-images 200 --steps 20 --reduced  # a labelled small run
    .venv/bin/python scripts/guidance_leaderboard.py --report-only                     # tables from finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGKIT = [str(ROOT / ".venv" / "bin" / "pagkit")]

# method -> (spec template with {s}, scales of the sweep)
UNCOND: dict[str, tuple[str, list[float]]] = {
    "none": ("none", [0.0]),
    "PAG": ("pag:{s}", [1.0, 2.0, 3.0]),
    "SoftPAG": ("softpag:{s}", [2.0, 3.0, 4.0]),
    "head-PAG": ("headpag:{s}/heads:[0,1]", [2.0, 3.0, 4.0]),
    "SEG": ("seg:{s}", [1.0, 2.0, 3.0]),
    "SLG (SD3.5 window)": ("slg:{s}", [1.0, 2.0, 3.0]),
    "SLG (whole run)": ("stg:{s}", [0.5, 1.0, 2.0]),
    "TPG": ("tpg:{s}", [0.5, 1.0, 2.0]),
    "SAG": ("sag:{s}", [0.5, 0.75, 1.0]),
    "autoguidance": ("auto:{s}", [0.5, 1.0, 2.0]),
    "PAG+autoguidance": ("pag:2+auto:{s}", [0.5, 1.0]),
}
COND: dict[str, tuple[str, list[float]]] = {
    "CFG": ("cfg:{s}", [1.5, 2.0, 3.0]),
    "APG": ("apg:{s}", [2.0, 3.0, 4.0]),
    "CFG-Zero*": ("cfgzero:{s}", [1.5, 2.0, 3.0]),
    "CFG++": ("cfgpp:{s}", [0.4, 0.6, 0.8]),
    "CFG+interval": ("cfg:{s}~interval-sigma:0.3:5", [2.0, 3.0, 4.0]),
    "CFG+PAG": ("cfg:{s}+pag:1", [1.5, 2.0, 3.0]),
    "APG+PAG": ("apg:{s}+pag:1", [2.0, 3.0, 4.0]),
    "CFG-Zero*+PAG": ("cfgzero:{s}+pag:1", [1.5, 2.0, 3.0]),
    "CFG++ +PAG": ("cfgpp:{s}+pag:1", [0.4, 0.6, 0.8]),
    "CFG+interval+PAG": ("cfg:{s}~interval-sigma:0.3:5+pag:1", [2.0, 3.0, 4.0]),
}


def spec_of(template: str, s: float) -> str:
    return template.format(s=f"{s:g}")


def sweep(methods: dict[str, tuple[str, list[float]]], quick: bool, only: str = "") -> dict[str, list[str]]:
    """method -> its configs (``quick``: the middle scale only; ``only``: comma-separated method names)."""
    out = {}
    keep = {m.strip() for m in only.split(",") if m.strip()}
    for method, (template, scales) in methods.items():
        if keep and method not in keep:
            continue
        chosen = [scales[len(scales) // 2]] if quick else scales
        out[method] = [spec_of(template, s) for s in chosen]
    return out


def run_eval(section: str, configs: list[str], args: argparse.Namespace, steps: int, labels: str) -> Path:
    out = Path(args.out) / section
    cmd = [
        *PAGKIT, "eval", "--configs", ",".join(configs), "--num-images", str(args.num_images), "--steps", str(steps),
        "--label-mode", labels, "--out", str(out), "--device", args.device, "--threads", args.threads,
        "--batch-size", str(args.batch_size), "--shard-size", str(min(250, args.num_images)), "--no-progress",
    ]  # fmt: skip
    if args.precision:
        cmd += ["--precision", args.precision]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def cost_per_step(spec: str, steps: int) -> tuple[float, float]:
    """(model evaluations per step, FLOPs per step relative to unguided) of ``spec`` on the embedded model,
    averaged over the DDIM steps (one image, labels 3; the unconditional branch where a CFG rule is on)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pagkit.guidance.engine import GuidedDenoiser
    from pagkit.guidance.schedules import Step
    from pagkit.guidance.spec import terms_of
    from pagkit.integrations.diffusers import step_of
    from pagkit.models.unet import NULL_CLASS, load_denoiser
    from pagkit.sampling.loops import make_scheduler

    model, config = _model_cache.setdefault("m", load_denoiser())
    scheduler = make_scheduler("ddim", config.scheduler_config())
    scheduler.set_timesteps(steps)
    terms = terms_of(spec)
    y = torch.tensor([3])
    d = GuidedDenoiser(model, {"class_labels": y}, {"class_labels": torch.full_like(y, NULL_CLASS)}, terms)
    plain = GuidedDenoiser(model, {"class_labels": y}, None, [])
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a: rows.append(int(a[0].shape[0])))
    evals, flops, base = 0.0, 0.0, 0.0
    try:
        for i, t in enumerate(scheduler.timesteps):
            step = Step(fraction=i / max(steps - 1, 1), sigma=step_of(scheduler, t).sigma, index=i)
            rows.clear()
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                d(x, t, step)
            evals += sum(rows)
            flops += counter.get_total_flops()
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                plain(x, t, step)
            base += counter.get_total_flops()
    finally:
        hook.remove()
    return evals / steps, flops / base


_model_cache: dict[str, Any] = {}


def method_of(name: str, methods: dict[str, list[str]]) -> str | None:
    for method, specs in methods.items():
        if name in specs:
            return method
    return None


def best_rows(results: dict[str, Any], methods: dict[str, list[str]], steps: int) -> list[dict[str, Any]]:
    """Each method's lowest-FID config, with its cost per step."""
    best: dict[str, dict[str, Any]] = {}
    for row in results["configs"]:
        method = method_of(row["name"], methods)
        if method is None:
            continue
        if method not in best or row["fid"] < best[method]["fid"]:
            best[method] = row
    out = []
    for method in methods:
        if method not in best:
            continue
        row = dict(best[method])
        row["method"] = method
        row["evals_per_step"], row["compute"] = cost_per_step(row["name"], steps)
        row["swept"] = len([r for r in results["configs"] if method_of(r["name"], methods) == method])
        out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | best config | FID ↓ | IS ↑ | precision | recall | density | coverage | evals/step | compute "
        "| s/img |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["fid"]):
        lines.append(
            f"| {r['method']} | `{r['name']}` | {r['fid']:.2f} | {r['is_mean']:.2f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['density']:.3f} | {r['coverage']:.3f} | {r['evals_per_step']:.2f} | "
            f"{r['compute']:.2f}x | {r.get('seconds_per_image', math.nan):.3f} |"
        )
    return "\n".join(lines)


def plot(path: Path, sections: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(6 * len(sections), 4.5), squeeze=False)
    for ax, (section, rows) in zip(axes[0], sections.items(), strict=True):
        for r in rows:
            ax.scatter(r["compute"], r["fid"])
            ax.annotate(r["method"], (r["compute"], r["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("compute per step (x unguided FLOPs)")
        ax.set_ylabel("FID (lower is better)")
        ax.set_title(section)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grids(path: Path, section_dir: Path, rows: list[dict[str, Any]]) -> None:
    """The eval's same-seed grids of the best configs, side by side with their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from pagkit.eval.configs import parse_config

    chosen = [(r["method"], section_dir / "grids" / f"{parse_config(r['name']).slug()}.png") for r in rows]
    chosen = [(m, p) for m, p in chosen if p.is_file()]
    if not chosen:
        return
    cols = min(5, len(chosen))
    rows_n = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 3.5 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (method, p) in zip(axes.flat, chosen, strict=False):
        ax.imshow(Image.open(p), cmap="gray")
        ax.set_title(method, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--steps", default="20,50", help="DDIM steps of the unconditional sections (comma-separated).")
    p.add_argument("--cond-steps", default="20", help="DDIM steps of the class-conditional sections.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default="auto")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--precision", default=None, help="fp32 (default of pagkit eval) or bf16.")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "guidance"))
    p.add_argument("--quick", action="store_true", help="One scale per method (the middle of its sweep).")
    p.add_argument("--reduced", action="store_true", help="Label the report as a reduced run.")
    p.add_argument("--sections", default="uncond,cond")
    p.add_argument("--methods", default="", help="Only these methods (comma-separated names as in the tables).")
    p.add_argument("--report-only", action="store_true", help="Only rebuild the tables from finished runs.")
    p.add_argument("--doc", default=None, help="Also write the tables between <!-- leaderboard --> markers here.")
    p.add_argument("--note", default="", help="A paragraph written above the tables (e.g. what a reduced run lacks).")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, dict[str, list[str]], int, str]] = []
    sections = {x.strip() for x in args.sections.split(",")}
    if "uncond" in sections:
        plan += [
            (f"uncond-ddim{s}", sweep(UNCOND, args.quick, args.methods), int(s), "none") for s in args.steps.split(",")
        ]
    if "cond" in sections:
        plan += [
            (f"cond-ddim{s}", sweep(COND, args.quick, args.methods), int(s), "uniform")
            for s in args.cond_steps.split(",")
        ]
    report: dict[str, Any] = {"num_images": args.num_images, "reduced": args.reduced, "sections": {}}
    best_by_section: dict[str, list[dict[str, Any]]] = {}
    for section, methods, steps, labels in plan:
        configs = [c for specs in methods.values() for c in specs]
        if not args.report_only:
            run_eval(section, configs, args, steps, labels)
        path = out / section / "results.json"
        if not path.is_file():
            print(f"{section}: no results yet", file=sys.stderr)
            continue
        results = json.loads(path.read_text())
        rows = best_rows(results, methods, steps)
        best_by_section[section] = rows
        report["sections"][section] = {"steps": steps, "labels": labels, "settings": results["settings"], "best": rows}
        grids(out / f"grids_{section}.png", out / section, rows)
    (out / "leaderboard.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    label = " (REDUCED RUN: not the 2,000-image leaderboard)" if args.reduced else ""
    md = [f"# Guidance leaderboard{label}", ""] + ([args.note, ""] if args.note else [])
    for section, rows in best_by_section.items():
        settings = report["sections"][section]["settings"]
        md += [
            f"## {section}: {settings['n']} images per config, DDIM {settings['steps']} steps, labels "
            f"{settings['label_mode']}, {settings.get('device', args.device)}",
            "",
            table(rows),
            "",
        ]
    (out / "leaderboard.md").write_text("\n".join(md))
    if best_by_section:
        plot(out / "fid_vs_compute.png", best_by_section)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text()
        start, end = "<!-- leaderboard -->\n", "<!-- /leaderboard -->"
        i, j = text.index(start) + len(start), text.index(end)
        body = "\n".join(["#" + line if line.startswith("#") else line for line in md]).strip() + "\n"
        doc.write_text(text[:i] + body + text[j:])
    print("\n".join(md))


if __name__ == "__main__":
    main()
