"""Refresh the tables of docs/results.md from the reports that scripts/paper_results.sh copied to docs/results/.

Between ``<!-- table:SECTION -->`` and ``<!-- /table -->`` the doc holds a copy of
``docs/results/SECTION/results.md``; between ``<!-- headline:SECTION,SECTION,... -->`` and ``<!-- /headline -->``
a table of each section's unguided row against its best PAG row (lowest FID), computed from the sections'
``results.json``. This script rewrites every such block, so the tables never carry a number the runs did not
produce. A block whose section has no report yet says so.

    python scripts/results_doc.py            # rewrite docs/results.md in place
    python scripts/results_doc.py --check    # exit 1 if the doc is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
HEADLINE = re.compile(r"(<!-- headline:(?P<names>[\w.,-]+) -->\n)(?P<body>.*?)(<!-- /headline -->)", re.S)


def _is_pag_only(name: str) -> bool:
    """A config that is PAG alone (any scale, layers, schedule or op), not summed with another term or cached."""
    return name.startswith("pag:") and "+" not in name and "%" not in name


def headline(names: list[str], root: Path) -> str:
    """One row per section: the unguided FID against the best PAG config's (lowest FID)."""
    lines = [
        "| section | sampler, steps | unguided FID | best PAG | PAG FID | FID change | IS unguided -> PAG |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for name in names:
        path = root / name / "results.json"
        if not path.is_file():
            lines.append(f"| {name} | (not run yet) | | | | | |")
            continue
        results = json.loads(path.read_text())
        rows = {row["name"]: row for row in results["configs"]}
        pag = [row for row in results["configs"] if _is_pag_only(row["name"])]
        if "none" not in rows or not pag:
            raise ValueError(f"section {name} needs a 'none' row and a PAG row for the headline table")
        base, best = rows["none"], min(pag, key=lambda row: row["fid"])
        s = results["settings"]
        change = best["fid"] / base["fid"] - 1
        lines.append(
            f"| {name} | {s['sampler'].upper()} {s['steps']} | {base['fid']:.2f} | `{best['name']}` | "
            f"{best['fid']:.2f} | {change:+.1%} | {base['is_mean']:.2f} -> {best['is_mean']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def refresh(doc: str, root: Path) -> str:
    def fill(match: re.Match[str]) -> str:
        report = root / match["name"] / "results.md"
        body = report.read_text() if report.is_file() else f"(not run yet: no report for section {match['name']})\n"
        return f"{match[1]}{body}{match[4]}"

    def fill_headline(match: re.Match[str]) -> str:
        return f"{match[1]}{headline(match['names'].split(','), root)}{match[4]}"

    return HEADLINE.sub(fill_headline, BLOCK.sub(fill, doc))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", default="docs/results.md")
    parser.add_argument("--reports", default="docs/results")
    parser.add_argument("--check", action="store_true", help="only check that the doc is up to date")
    args = parser.parse_args()
    path = Path(args.doc)
    old = path.read_text()
    new = refresh(old, Path(args.reports))
    if args.check:
        if new != old:
            print(f"{path} is out of date: run python scripts/results_doc.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
