"""Train the embedded Fashion-MNIST classifier, the default feature network of the metrics."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pagkit.data import load_split
from pagkit.models.classifier import ClassifierConfig, FashionClassifier
from pagkit.weights import save_tensors


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Optimisation settings of ``pagkit train-classifier``."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    threads: int = 0  # 0: leave torch's thread count as it is (the CLI's --threads sets it)


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 127.5 - 1.0


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (background -1 fills the border)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


@torch.no_grad()
def accuracy(model: FashionClassifier, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``[N, 28, 28]``."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        logits = model(_to_input(images[i : i + batch]))
        correct += int((logits.argmax(1) == torch.as_tensor(labels[i : i + batch])).sum())
    return correct / len(labels)


def train_classifier(
    out: str | os.PathLike[str],
    config: ClassifierConfig = ClassifierConfig(),
    train: ClassifierTrainConfig = ClassifierTrainConfig(),
    data_dir: str | os.PathLike[str] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[Path, float]:
    """Train, evaluate on the test split, write ``out`` (safetensors) and a ``.log.jsonl`` beside it.

    ``max_steps`` stops after so many optimizer steps (a short run; the schedule still spans ``epochs``)."""
    out = Path(out)
    if train.threads:
        torch.set_num_threads(train.threads)
    tr, te = load_split("train", data_dir), load_split("test", data_dir)
    torch.manual_seed(train.seed)
    g = torch.Generator().manual_seed(train.seed)
    model = FashionClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = len(tr) // train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {train.batch_size} exceeds the {len(tr)} training images")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, train.lr, total_steps=train.epochs * steps_per_epoch)
    x_all, y_all = _to_input(tr.images), torch.as_tensor(tr.labels)
    log = []
    t0 = time.perf_counter()
    done = 0
    acc = 0.0
    for epoch in range(train.epochs):
        if max_steps is not None and done >= max_steps:
            break
        model.train()
        perm = torch.randperm(len(y_all), generator=g)
        steps = steps_per_epoch if max_steps is None else min(steps_per_epoch, max_steps - done)
        desc = f"classifier epoch {epoch + 1}/{train.epochs}"
        bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress)
        total = 0.0
        for i in bar:
            idx = perm[i * train.batch_size : (i + 1) * train.batch_size]
            loss = F.cross_entropy(model(_augment(x_all[idx], g)), y_all[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            done += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = accuracy(model, te.images, te.labels)
        record = {
            "epoch": epoch + 1,
            "steps": done,
            "loss": round(total / max(steps, 1), 4),
            "test_accuracy": round(acc, 4),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        log.append(record)
        if progress:
            tqdm.write(json.dumps(record))
    model.eval()
    meta = {"classifier": config.to_dict(), "train": asdict(train), "steps": done, "test_accuracy": acc}
    save_tensors(out, model.state_dict(), meta)
    out.with_suffix(".log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return out, acc
