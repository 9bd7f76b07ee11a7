"""Build every tiny pipeline family (pagkit.testing.families) and run it with CFG and, where it has one, without.

Prints one line per run: family, mode, build and run seconds, output shape. Exits non-zero if any run failed.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/family_smoke.py            # every family
    OMP_NUM_THREADS=1 .venv/bin/python scripts/family_smoke.py flux wan   # some of them
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from pagkit.testing.families import FAMILIES, UNBUILDABLE, get, output_tensor, without_cfg


def run_family(name: str, seeds: list[int]) -> list[dict[str, Any]]:
    """Build one family and run its ``call`` (and its guidance-off variant); one record per run."""
    fam = get(name)
    t0 = time.perf_counter()
    pipe = fam.build()
    build_s = time.perf_counter() - t0
    modes: list[tuple[str, Any]] = [("cfg" if fam.cfg else "no-cfg", fam.call)]
    off = without_cfg(name)
    if off is not None:
        modes.append(("no-cfg", off))
    records = []
    for mode, call in modes:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = output_tensor(pipe(**call(seeds)))
        run_s = time.perf_counter() - t0
        records.append(
            {
                "name": name,
                "mode": mode,
                "build_s": round(build_s, 3),
                "run_s": round(run_s, 3),
                "shape": list(out.shape),
                "finite": bool(torch.isfinite(out).all()),
                "slow": fam.slow,
            }
        )
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="families to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="per-image seeds (batch size = count)")
    parser.add_argument("--skip-slow", action="store_true", help="leave out families marked slow")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names = args.names or [n for n, f in FAMILIES.items() if not (args.skip_slow and f.slow)]
    records: list[dict[str, Any]] = []
    failed: list[str] = []
    print(f"{'family':<20} {'mode':<7} {'build s':>8} {'run s':>7}  output shape")
    for name in names:
        try:
            recs = run_family(name, args.seeds)
        except Exception:  # report and go on with the other families
            failed.append(name)
            print(f"{name:<20} FAILED\n{traceback.format_exc()}", flush=True)
            continue
        for r in recs:
            flag = "" if r["finite"] else "  NON-FINITE"
            print(f"{r['name']:<20} {r['mode']:<7} {r['build_s']:>8.2f} {r['run_s']:>7.2f}  {tuple(r['shape'])}{flag}")
            if not r["finite"]:
                failed.append(name)
        sys.stdout.flush()
        records.extend(recs)
    for name, reason in UNBUILDABLE.items():
        print(f"{name:<20} UNBUILDABLE: {reason}")
    if args.json:
        args.json.write_text(json.dumps({"runs": records, "failed": failed, "unbuildable": UNBUILDABLE}, indent=1))
    total = sum(r["run_s"] for r in records)
    print(f"{len(records)} runs of {len(names) - len(failed)} families in {total:.1f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
