"""'Training PAG' experiment (issue 13): does fine-tuning with identity-attention dropout on the PAG layers make
PAG's gain larger, or its best scale more stable? Fine-tunes two copies of the shipped denoiser the same way,
with identity attention on `mid` for a fraction p of the rows and with p = 0 (the control), then evaluates both
with `pagkit eval` at 20 DDIM steps (same seeds). Resumable: rerun the same command.

    OMP_NUM_THREADS=1 nohup nice -n 10 .venv/bin/python scripts/distill_training_pag.py --p 0.2 --steps 400 \
        --n 1000 > runs/training-pag/stdout.log 2>&1 &

Outputs: runs/training-pag/p{P}/ and p0/ (weights, log), runs/training-pag/eval-p{P}, eval-p0 (reports), and a
summary JSON (--json) with each model's FID per scale, its best scale and PAG's gain against its own unguided FID.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from pagkit.distill.training_pag import DropoutConfig, finetune_identity_dropout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n", type=int, default=1000, help="Images per eval config.")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--configs", default="none,pag:1,pag:2,pag:3,pag:5")
    ap.add_argument("--root", default="runs/training-pag")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--json", default="docs/distill/training_pag.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(args.threads))
    root = Path(args.root)
    summary: dict[str, object] = {"settings": vars(args)}
    for p in (args.p, 0.0):
        name = f"p{p:g}"
        cfg = replace(DropoutConfig(), p=p, steps=args.steps, batch_size=args.batch_size)
        folder = root / name
        ckpt = folder / "checkpoint.safetensors"
        done = False
        if ckpt.is_file():
            from pagkit.weights import load_tensors

            done = int(load_tensors(ckpt)[1]["step"]) >= args.steps
        weights = folder / "denoiser.safetensors"
        if not done:
            weights = finetune_identity_dropout(folder, cfg, resume=ckpt.is_file(), progress=False)
        out = root / f"eval-{name}"
        cmd = [
            sys.executable, "-m", "pagkit", "eval", "--weights", str(weights), "--configs", args.configs,
            "--steps", str(args.eval_steps), "--n", str(args.n), "--out", str(out), "--threads", args.threads,
            "--no-progress",
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
        report = json.loads((out / "results.json").read_text())
        summary[name] = report
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
