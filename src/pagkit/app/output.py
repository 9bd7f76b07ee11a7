"""Write images and videos: PNG (also JPEG/WebP) for images; animated GIF/WebP, or MP4 where a writer is installed.

Every write is atomic (:func:`pagkit.store.atomic_write`): a failure leaves no partial file. The checks that need
no model (:func:`check_extension`) run before anything loads; :func:`check_fits` once the pipeline says whether it
makes video.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".gif", ".webp", ".mp4")
ALL_SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES + VIDEO_SUFFIXES))
FPS = 8


def mp4_writer() -> str | None:
    """The installed MP4 writer: ``av`` (PyAV) or ``imageio`` with ``imageio_ffmpeg``; None if neither."""
    if importlib.util.find_spec("av") is not None:
        return "av"
    if importlib.util.find_spec("imageio") is not None and importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "imageio"
    return None


def check_extension(out: str, suffixes: tuple[str, ...] = ALL_SUFFIXES) -> Path:
    """The output path, writable, with a known suffix (and an MP4 writer for .mp4); before any model loads."""
    from pagkit.options import check_output

    path = check_output(out, suffixes)
    if path.suffix.lower() == ".mp4" and mp4_writer() is None:
        raise ValueError("no MP4 writer is installed (pip install av): write .gif or .webp instead")
    return path


def check_fits(path: Path, video: bool, what: str) -> None:
    """A video model writes .gif/.webp/.mp4, an image model .png/.jpg/.webp."""
    suffix = path.suffix.lower()
    if video and suffix not in VIDEO_SUFFIXES:
        stem = path.with_suffix("")
        raise ValueError(f"{what} makes video, which {suffix} cannot hold: write {stem}.gif, {stem}.webp or {stem}.mp4")
    if not video and suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{what} makes images, not video: write {path.with_suffix('.png')}")


def _write_mp4(frames: Any, tmp: str, fps: int) -> None:
    import numpy as np

    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    if mp4_writer() == "av":
        import importlib

        av: Any = importlib.import_module("av")
        pad = np.zeros((frames.shape[0], h + h % 2, w + w % 2, 3), dtype=np.uint8)  # yuv420p needs even sides
        pad[:, :h, :w] = frames
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = pad.shape[2], pad.shape[1]
            stream.pix_fmt = "yuv420p"
            for frame in pad:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    else:
        import importlib

        imageio: Any = importlib.import_module("imageio")
        imageio.mimwrite(tmp, list(frames), fps=fps, format="FFMPEG")


def write_media(path: Path, media: Any, fps: int = FPS) -> None:
    """Write one image ``[H, W, 3]`` or one video ``[F, H, W, 3]`` (uint8) to ``path`` by its suffix."""
    import numpy as np
    from PIL import Image

    from pagkit.store import atomic_write

    arr = np.asarray(media)
    suffix = path.suffix.lower()
    if arr.ndim == 3:
        fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[suffix]
        image = Image.fromarray(arr)
        atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
        return
    if suffix == ".mp4":
        atomic_write(path, lambda tmp: _write_mp4(arr, tmp, fps))
        return
    frames = [Image.fromarray(f) for f in arr]
    fmt = "GIF" if suffix == ".gif" else "WEBP"
    extra: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    atomic_write(
        path,
        lambda tmp: frames[0].save(
            tmp, format=fmt, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0, **extra
        ),
    )
