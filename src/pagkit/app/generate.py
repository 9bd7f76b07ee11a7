"""``pagkit generate``: one image or video from a local diffusers pipeline under a guidance spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagkit.app.run import Inputs


def generate_to_file(
    model: str,
    inputs: Inputs,
    guidance: str,
    seed: int,
    out: Path,
    device: str = "auto",
    dtype: str = "auto",
    config: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Load, check everything that can be checked before sampling, sample one output and write it; returns a
    summary (pipeline, settings, seconds)."""
    import time

    from pagkit.app import loading, output, run
    from pagkit.guidance.spec import parse_guidance

    parse_guidance(guidance)  # a bad spec fails before the model loads
    pipe = loading.load_pipeline(model, device, dtype, config)
    info = loading.describe(pipe)
    loading.check_servable(pipe, info)
    run.check_inputs(info, inputs)
    output.check_fits(out, info.video, info.name)
    plan = run.plan(pipe, guidance, inputs, info)
    pipe.set_progress_bar_config(disable=not progress)
    start = time.perf_counter()
    media = run.run(pipe, plan, inputs, [seed], info)
    seconds = time.perf_counter() - start
    output.check_fits(out, media.ndim == 5, info.name)
    output.write_media(out, media[0])
    return {"pipeline": info.name, "guidance": plan.described, "seconds": seconds, "shape": list(media.shape[1:])}
