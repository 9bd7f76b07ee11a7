"""``pagkit compare``: the same seeds under several guidance settings, one labelled grid and a JSON record.

Rows are settings, columns seeds. A sweep ``METHOD:V1,V2,...`` (e.g. ``pag:0,1,3,5`` or ``cfg:4+pag:1,3@mid``)
expands to one setting per value. Video models give an animated grid (.gif/.webp) or, in a PNG, each video's
first frame.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pagkit.app.run import Inputs

_SWEEP = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_-]*):(?P<values>[-+0-9.eE]+(?:\s*,\s*[-+0-9.eE]+)+)(?P<rest>.*)$")


def expand_sweep(text: str) -> list[str]:
    """``pag:0,1,3`` -> ``["pag:0", "pag:1", "pag:3"]``; exactly one term of the spec lists its scales."""
    from pagkit.guidance.spec import parse_guidance, split_outside

    parts = [p.strip() for p in split_outside(text.strip(), "+")]
    hits = [i for i, p in enumerate(parts) if _SWEEP.match(p)]
    if len(hits) != 1:
        raise ValueError(
            f"--sweep {text!r}: give one term with a comma-separated list of scales, e.g. pag:0,1,3,5 or "
            "cfg:4+pag:0,2,4"
        )
    i = hits[0]
    m = _SWEEP.match(parts[i])
    assert m is not None
    out = []
    for value in m.group("values").split(","):
        term = f"{m.group('name')}:{value.strip()}{m.group('rest')}"
        spec = "+".join([*parts[:i], term, *parts[i + 1 :]])
        parse_guidance(spec)  # each expanded spec must parse
        out.append(spec)
    return out


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or a range ``0-3`` (inclusive)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo or hi - lo > 256:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds {text!r}: give seeds as 0,1,2 or a range 0-3") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: give seeds as 0,1,2 or a range 0-3 (non-negative)")
    return seeds


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def labelled_grid(
    rows: Sequence[np.ndarray], row_labels: Sequence[str], col_labels: Sequence[str], cell: int = 128
) -> Any:
    """One RGB PIL image: ``rows[r][c]`` (uint8 ``[H, W, 3]``) scaled to ``cell`` px high, labels left and top."""
    from PIL import Image, ImageDraw

    first = rows[0][0]
    h, w = first.shape[:2]
    scale = max(1, round(cell / h))
    ch, cw = h * scale, w * scale
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(t, font=font)) for t in row_labels) + 16
    head, pad = 24, 4
    width = label_w + len(col_labels) * (cw + pad) + pad
    height = head + len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels):
        draw.text((label_w + pad + c * (cw + pad) + 2, 5), text, fill="black", font=font)
    for r, (row, text) in enumerate(zip(rows, row_labels, strict=True)):
        y = head + pad + r * (ch + pad)
        draw.text((6, y + ch // 2 - 8), text, fill="black", font=font)
        for c, img in enumerate(row):
            tile = Image.fromarray(np.ascontiguousarray(img)).resize((cw, ch), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (cw + pad), y))
    return canvas


def write_grid(path: Path, results: Sequence[np.ndarray], labels: Sequence[str], seeds: Sequence[int]) -> None:
    """Write the grid of ``results`` (per setting: ``[N, H, W, 3]`` or videos ``[N, F, H, W, 3]``)."""
    from pagkit.app.output import VIDEO_SUFFIXES, write_media

    cols = [f"seed {s}" for s in seeds]
    video = results[0].ndim == 5
    if video and path.suffix.lower() in VIDEO_SUFFIXES:
        frames = results[0].shape[1]
        grids = [
            np.asarray(labelled_grid([r[:, f] for r in results], labels, cols).convert("RGB")) for f in range(frames)
        ]
        write_media(path, np.stack(grids))
        return
    rows = [r[:, 0] if video else r for r in results]
    write_media(path, np.asarray(labelled_grid(rows, labels, cols).convert("RGB")))


def compare_to_files(
    model: str,
    inputs: Inputs,
    settings: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    device: str = "auto",
    dtype: str = "auto",
    config: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every setting on the same seeds; write the grid to ``out`` and the record beside it (``.json``)."""
    import time

    from tqdm.auto import tqdm

    from pagkit.app import loading, run
    from pagkit.guidance.spec import parse_guidance
    from pagkit.store import atomic_write

    if not settings:
        raise ValueError("give at least one --guidance SPEC or a --sweep")
    for text in settings:
        parse_guidance(text)
    pipe = loading.load_pipeline(model, device, dtype, config)
    info = loading.describe(pipe)
    loading.check_servable(pipe, info)
    run.check_inputs(info, inputs)
    if info.video and out.suffix.lower() not in (".png", ".gif", ".webp"):
        raise ValueError(f"{info.name} makes video: write the comparison to .gif, .webp (animated) or .png")
    plans = [run.plan(pipe, text, inputs, info) for text in settings]  # every setting checked before sampling
    results, record = [], []
    for p in tqdm(plans, desc="settings", unit="setting", disable=not progress):
        start = time.perf_counter()
        media = run.run(pipe, p, inputs, seeds, info)
        seconds = time.perf_counter() - start
        results.append(media)
        record.append(
            {"guidance": p.text, "applied": p.described, "pipeline_args": p.call, "seconds": round(seconds, 4)}
        )
    write_grid(out, results, [p.text for p in plans], seeds)
    summary = {
        "model": str(model),
        "pipeline": info.name,
        "prompt": inputs.prompt,
        "negative_prompt": inputs.negative_prompt,
        "class": inputs.class_label,
        "steps": inputs.steps,
        "height": inputs.height,
        "width": inputs.width,
        "frames": inputs.frames,
        "seeds": list(seeds),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "settings": record,
        "grid": out.name,
    }
    json_path = out.with_suffix(".json")
    text = json.dumps(summary, indent=2)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text + "\n"))
    return summary
