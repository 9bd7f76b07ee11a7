"""Refresh the tables of docs/results.md from the reports that scripts/paper_results.sh copied to docs/results/.

Between ``<!-- table:SECTION -->`` and ``<!-- /table -->`` the doc holds a copy of
``docs/results/SECTION/results.md``; this script rewrites every such block, so the prose around a table never
carries a number the runs did not produce. A block whose section has no report yet says so.

    python scripts/results_doc.py            # rewrite docs/results.md in place
    python scripts/results_doc.py --check    # exit 1 if the doc is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def refresh(doc: str, root: Path) -> str:
    def fill(match: re.Match[str]) -> str:
        report = root / match["name"] / "results.md"
        body = report.read_text() if report.is_file() else f"(not run yet: no report for section {match['name']})\n"
        return f"{match[1]}{body}{match[4]}"

    return BLOCK.sub(fill, doc)


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
