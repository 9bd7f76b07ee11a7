"""Quality against cost of every option (issue 13): FID from `scripts/distill_quality.sh` reports, time per step
from `scripts/distill_cost.py`, on one plot per section, and a Markdown table.

    .venv/bin/python scripts/distill_plot.py --cost docs/distill/cost.json docs/distill/cost_student.json \
        --eval runs/distill-eval/uncond-ddim20-n2000 runs/distill-eval/uncond-ddim50-n2000 \
        --out docs/distill/quality_cost.png --md docs/distill/quality_cost.md

Options without an FID in a given report (e.g. the cached delta or CFG alone) are drawn only where a report has
them: pass their reports too (e.g. docs/results/sweep-uncond for pag:2%2 at 50 steps; the FID of different
reports compares only at the same n, steps and device).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# config name in an eval report -> option name in the cost table
COST_NAMES = {
    "none": "unguided",
    "distilled:none": "distilled pag:2",  # the student's cost does not depend on the scale
    "distilled:pag:2": "distilled pag:2",
    "distilled:pag:3": "distilled pag:2",
    "distilled:cfg:1.25+pag:1": "distilled cfg:1.25+pag:1",
    "pag:2": "pag:2 (full)",
    "pag:3": "pag:2 (full)",
    "pag:2%2": "pag:2%2 (cached delta)",
    "pag:3%2": "pag:2%2 (cached delta)",
    "cfg:1.5": "cfg:1.5",
    "cfg:1.25+pag:1": "cfg:1.25+pag:1",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cost",
        nargs="+",
        default=["docs/distill/cost.json", "docs/distill/cost_student.json"],
        help="distill_cost.py JSON files; a later file's options override an earlier one's (more repetitions).",
    )
    ap.add_argument("--eval", nargs="+", required=True, help="pagkit eval output folders (with results.json).")
    ap.add_argument("--out", default="docs/distill/quality_cost.png")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost: dict[str, float] = {}
    for path in args.cost:
        cost.update({r["option"]: r["ratio"] for r in json.loads(Path(path).read_text())["rows"]})
    fig, axes = plt.subplots(1, len(args.eval), figsize=(5 * len(args.eval), 4), squeeze=False)
    lines = ["| report | config | FID | IS | time per step vs unguided |", "|---|---|---:|---:|---:|"]
    for ax, folder in zip(axes[0], args.eval, strict=True):
        report = json.loads((Path(folder) / "results.json").read_text())
        s = report["settings"]
        title = f"{Path(folder).name}: {s.get('sampler')} {s.get('steps')} steps, n={s.get('n')}"
        for c in report["configs"]:
            option = COST_NAMES.get(c["name"])
            if option is None or option not in cost:
                continue
            x, y = cost[option], c["fid"]
            marker = "*" if c["name"].startswith("distilled") else "o"
            ax.scatter([x], [y], marker=marker, s=90 if marker == "*" else 40)
            ax.annotate(c["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            lines.append(f"| {Path(folder).name} | `{c['name']}` | {y:.2f} | {c['is_mean']:.2f} | {x:.3f}x |")
        ax.set_xlabel("time per step / unguided (paired, CPU)")
        ax.set_ylabel("FID (lower is better)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
