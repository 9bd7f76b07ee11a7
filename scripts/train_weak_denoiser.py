"""Train autoguidance's weak model of the embedded denoiser (shipped as weights/weak_denoiser.safetensors).

The weak model is the embedded U-Net at a quarter of its width (block channels 16/32/64 instead of 32/64/128,
0.73M parameters instead of 2.79M) trained by pagkit's own trainer for 0.7 epoch (656 steps of 64 images, fp32,
lr 1e-3): smaller *and* shorter-trained, as Karras et al. (arXiv 2406.02507) prescribe for autoguidance, so that
it makes the main model's kinds of errors, only more strongly. Resumable like ``pagkit train``.

    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/train_weak_denoiser.py --out runs/weak [--resume]
    cp runs/weak/denoiser.safetensors src/pagkit/models/weights/weak_denoiser.safetensors
"""

from __future__ import annotations

import argparse

import torch

from pagkit.models.unet import DenoiserConfig
from pagkit.train.denoiser import TrainConfig, train_denoiser

WEAK = DenoiserConfig(block_out_channels=(16, 32, 64), attention_head_dim=16, norm_num_groups=8)
TRAIN = TrainConfig(epochs=0.7, batch_size=64, lr=1e-3, warmup_steps=100, bf16=False, threads=1, checkpoint_every=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/weak")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train_denoiser(args.out, config=WEAK, train=TRAIN, resume=args.resume, progress=True)


if __name__ == "__main__":
    main()
