"""``pagkit sample`` writes as it goes: images land in checksummed part files beside the output, then one file.

``OUT.parts/`` holds ``parts.json`` (the settings that decide the images, hashed) and ``part-00000.npz`` ...
(``images`` uint8 ``[k, 28, 28]``, ``labels`` int64 ``[k]``, ``first_index``; written with
:func:`pagkit.store.save_arrays`). A killed run keeps every finished part; the same command run again samples
only the missing ones, and a damaged part is set aside and sampled again. When all parts exist they are joined
into ``OUT`` (an ``.npz`` streamed part by part, never held in memory whole, or a PNG grid) and the folder is
removed. Parts start at multiples of the batch size, so a resumed run gives the images of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pagkit.store import DamagedFile, atomic_write, load_arrays, notice, save_arrays, set_aside

PART_IMAGES = 1024  # images per part, rounded up to a multiple of the batch size


def part_size(batch_size: int) -> int:
    """Images per part: at least ``PART_IMAGES``, a multiple of ``batch_size``."""
    return batch_size * math.ceil(PART_IMAGES / batch_size)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex, 16 characters)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Part:
    index: int
    start: int
    count: int

    @property
    def filename(self) -> str:
        return f"part-{self.index:05d}.npz"


def _spec() -> dict[str, tuple[str, tuple[int | None, ...]]]:
    return {"images": ("uint8", (None, 28, 28)), "labels": ("int64", (None,)), "first_index": ("int64", ())}


class SampleParts:
    """The part files of one ``pagkit sample`` output (see the module docstring)."""

    def __init__(self, out: Path, settings: dict[str, Any], n: int, size: int) -> None:
        self.out = Path(out)
        self.folder = self.out.with_name(self.out.name + ".parts")
        self.settings = {**settings, "part_size": size}
        self.key = hashlib.sha256(json.dumps(self.settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.n = n
        self.parts = [Part(i, s, min(size, n - s)) for i, s in enumerate(range(0, n, size))]

    @property
    def manifest(self) -> Path:
        return self.folder / "parts.json"

    def open(self) -> int:
        """Drop parts of other settings; return how many images of this run already exist."""
        if self.folder.is_dir():
            try:
                same = json.loads(self.manifest.read_text()).get("key") == self.key
            except (OSError, ValueError, AttributeError):
                same = False
            if not same:
                stale = sorted(self.folder.glob("part-*.npz"))
                if stale:
                    notice(f"{self.folder} holds partial samples of other settings: discarding them")
                for path in stale:
                    path.unlink()
                self.manifest.unlink(missing_ok=True)
        return sum(p.count for p in self.parts if self.read(p) is not None)

    def read(self, part: Part) -> dict[str, np.ndarray] | None:
        """A finished part's arrays; None when it is missing, of another plan (removed) or damaged (set aside)."""
        path = self.folder / part.filename
        if not path.is_file():
            return None
        try:
            arrays = load_arrays(path, _spec())
        except DamagedFile as e:
            set_aside(path, e.reason, "partial output")
            return None
        if len(arrays["images"]) != part.count or int(arrays["first_index"]) != part.start:
            path.unlink()  # written for another --n: this run's part is longer or shorter
            return None
        if len(arrays["labels"]) != part.count:
            set_aside(path, "labels and images differ in number", "partial output")
            return None
        return arrays

    def write(self, part: Part, images: np.ndarray, labels: np.ndarray) -> None:
        if not self.manifest.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"key": self.key, "settings": self.settings}, indent=2, default=str)
            atomic_write(self.manifest, lambda tmp: Path(tmp).write_text(text))
        arrays = {"images": images, "labels": labels, "first_index": np.int64(part.start)}
        save_arrays(self.folder / part.filename, arrays)

    def _arrays(self) -> Iterator[dict[str, np.ndarray]]:
        for part in self.parts:
            arrays = self.read(part)
            if arrays is None:
                raise ValueError(f"part {self.folder / part.filename} disappeared or is damaged: run the command again")
            yield arrays

    def finish(self) -> None:
        """Join the parts into the output file, then remove the part folder."""
        if self.out.suffix.lower() == ".npz":
            atomic_write(self.out, self._write_npz)
        else:
            from pagkit.viz import grid, save_png

            images = np.concatenate([a["images"] for a in self._arrays()])
            save_png(grid(images, ncols=min(10, len(images))), self.out)
        self.remove()

    def _write_npz(self, tmp: str) -> None:
        """``images`` uint8 ``[n, 28, 28]`` and ``labels`` int64 ``[n]``, as ``np.savez`` lays them out."""
        fmt = np.lib.format
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, dtype, shape in (("images", np.uint8, (self.n, 28, 28)), ("labels", np.int64, (self.n,))):
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    header = {"descr": fmt.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
                    fmt.write_array_header_1_0(f, header)
                    for arrays in self._arrays():
                        f.write(np.ascontiguousarray(arrays[key], dtype=dtype).tobytes())

    def remove(self) -> None:
        if self.folder.is_dir():
            shutil.rmtree(self.folder)
