"""DPS vs DPS+PAG on the embedded Fashion-MNIST model, per task: PSNR, SSIM, FID and classifier accuracy.

Restores the first N test images (default 500) for every task and PAG scale (0 = plain DPS), with the same
per-image seeds (the same measurements and initial noise for every scale), and writes ``table.json`` and
``table.md`` in ``--out-dir``. Restorations are cached per task, scale and chunk of images (``--chunk``) in
``--out-dir/cache``, so an interrupted run resumes where it stopped.

    python scripts/restore_table.py                          # 500 images, scales 0,3,5, all tasks
    python scripts/restore_table.py --n 16 --pag-scales 0,3  # a smoke run (FID needs >= 128 images)
    python scripts/restore_table.py --render runs/restore/table.json   # rewrite table.md from a table.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _restore_cached(cache: Path, settings: dict[str, Any], run: Any, start: int, count: int) -> np.ndarray:
    from pagkit.weights import atomic_write

    path = cache / f"{settings['task']}-s{settings['pag_scale']:g}-{_key(settings)}-{start:06d}-{count}.npz"
    if path.is_file():
        return np.load(path)["images"]
    images = run(start, count)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, settings=json.dumps(settings))

    atomic_write(path, write)
    return images


def _ceiling(results: dict[str, Any]) -> str:
    accs = {t: r[0]["target_accuracy"] for t, r in results["tasks"].items()}
    if len(set(accs.values())) == 1:
        return f"{next(iter(accs.values())):.3f}"
    return ", ".join(f"{t} {a:.3f}" for t, a in accs.items())


def markdown(results: dict[str, Any]) -> str:
    """One table per task: DPS (scale 0) and DPS+PAG at each scale; the best PAG scale by FID (else accuracy)."""
    s = results["settings"]
    lines = [
        f"**DPS vs DPS+PAG on the embedded Fashion-MNIST model ({s['n']} test images per task)**",
        "",
        f"Command: `{results['command']}`; machine: {results.get('machine', 'unrecorded')}.",
        "",
        f"{s['steps']} {s['sampler'].upper()} steps, zeta {s['zeta']:g}, measurement noise sigma "
        f"{s['noise_sigma']:g}, PAG on `{s['pag_layers']}`, seed {s['seed']}; unconditional model. FID: "
        "restorations vs the ground-truth images, in the embedded classifier's features; accuracy: the classifier "
        f"on the restorations (on the ground truth: {_ceiling(results)}).",
        "",
    ]
    for task, rows in results["tasks"].items():
        pag = [r for r in rows if r["pag_scale"] != 0]
        best = None
        if len(pag) > 1:
            best = min(pag, key=lambda r: (r["fid"] if r["fid"] is not None else 0.0, -r["accuracy"]))
        lines += [
            f"#### {task}",
            "",
            "| method | PAG scale | PSNR (dB) | SSIM | FID | accuracy | s/image |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            name = "DPS" if r["pag_scale"] == 0 else "DPS+PAG" + (" (best)" if r is best else "")
            fid = "n/a" if r["fid"] is None else f"{r['fid']:.2f}"
            lines.append(
                f"| {name} | {r['pag_scale']:g} | {r['psnr']:.2f} | {r['ssim']:.3f} | {fid} | {r['accuracy']:.3f} "
                f"| {r['seconds_per_image']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="test images per task (FID needs >= 128)")
    parser.add_argument("--tasks", default="inpaint,sr4,deblur")
    parser.add_argument("--pag-scales", default="0,3,5", help="comma-separated; 0 is plain DPS")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default=None)
    parser.add_argument("--zeta", type=float, default=None)
    parser.add_argument("--noise-sigma", type=float, default=None)
    parser.add_argument("--pag-layers", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=100, help="images per cached chunk")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="where the denoiser runs: cpu, cuda")
    parser.add_argument("--weights", default=None, help="denoiser .safetensors [default: embedded]")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default="runs/restore_table")
    parser.add_argument("--render", default=None, help="only rewrite table.md beside this table.json")
    args = parser.parse_args(argv)
    if args.render:
        table = Path(args.render)
        (table.parent / "table.md").write_text(markdown(json.loads(table.read_text())))
        print(f"wrote {table.parent / 'table.md'}")
        return 0
    torch.set_num_threads(args.threads)

    from pagkit.data import load_split
    from pagkit.eval.features import file_digest
    from pagkit.inverse.metrics import restoration_metrics
    from pagkit.inverse.operators import make_operator
    from pagkit.inverse.restore import RESTORE, measure, restore
    from pagkit.models.unet import default_denoiser_path, load_denoiser
    from pagkit.weights import atomic_write

    tasks = [t for t in args.tasks.split(",") if t]
    scales = [float(s) for s in args.pag_scales.split(",") if s]
    operators = {t: make_operator(t) for t in tasks}  # unknown tasks fail here, before anything runs
    d = asdict(RESTORE)
    settings = {
        "n": args.n,
        "steps": args.steps or d["steps"],
        "sampler": args.sampler or d["sampler"],
        "zeta": d["zeta"] if args.zeta is None else args.zeta,
        "noise_sigma": d["noise_sigma"] if args.noise_sigma is None else args.noise_sigma,
        "pag_layers": args.pag_layers or d["pag_layers"],
        "seed": args.seed,
    }
    weights = Path(args.weights) if args.weights else default_denoiser_path()
    unet, config = load_denoiser(weights)
    model = (unet.to(args.device), config)
    data = load_split("test", args.data_dir)
    if not 1 <= args.n <= len(data):
        raise SystemExit(f"--n must be in 1..{len(data)}")
    targets, labels = data.images[: args.n], data.labels[: args.n]
    out_dir = Path(args.out_dir)
    cache = out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(["python scripts/restore_table.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {**settings, "weights": str(weights), "weights_sha256": file_digest(weights)},
        "machine": f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
        + (f", {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else ""),
        "tasks": {},
    }
    for task in tasks:
        op = operators[task]
        y = measure(targets, op, settings["noise_sigma"], args.seed)
        rows = []
        for scale in scales:
            key = {**settings, "task": task, "pag_scale": scale, "weights": results["settings"]["weights_sha256"]}
            t0 = time.time()

            def run(start: int, count: int, scale: float = scale, op: Any = op, y: torch.Tensor = y) -> np.ndarray:
                return restore(
                    y[start : start + count],
                    op,
                    steps=settings["steps"],
                    sampler=settings["sampler"],
                    zeta=settings["zeta"],
                    pag_scale=scale,
                    pag_layers=settings["pag_layers"],
                    seed=args.seed,
                    first_index=start,
                    batch_size=args.batch_size or d["batch_size"],
                    model=model,
                )

            chunks = [
                _restore_cached(cache, key, run, start, min(args.chunk, args.n - start))
                for start in range(0, args.n, args.chunk)
            ]
            images = np.concatenate(chunks)
            row = {"pag_scale": scale, **restoration_metrics(images, targets, labels)}
            row["seconds_per_image"] = (time.time() - t0) / args.n  # ~0 when every chunk came from the cache
            rows.append(row)
            print(json.dumps({"task": task, **row}), flush=True)
        results["tasks"][task] = rows
    text = json.dumps(results, indent=2)
    atomic_write(out_dir / "table.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    atomic_write(out_dir / "table.md", lambda tmp: Path(tmp).write_text(markdown(results)))
    print(f"wrote {out_dir / 'table.json'} and {out_dir / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
