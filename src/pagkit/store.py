"""Files a run writes and later reads back: atomic writes, and ``.npz`` arrays carrying a checksum of their content.

Every array file that pagkit reads back (evaluation shards, feature caches, the partial outputs of
``pagkit sample``) is written by :func:`save_arrays`, which stores a sha256 of the arrays' names, dtypes, shapes
and bytes next to them. :func:`load_arrays` checks the format, the keys, dtypes and shapes against a spec, and
that checksum; any mismatch raises :class:`DamagedFile` with the reason. Callers set a damaged file aside
(:func:`set_aside`) and recompute it; a damaged file that the user gave is a one-line error instead.

This module imports no torch, and numpy only when arrays are read or written.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

CHECKSUM_KEY = "checksum"
# a spec: key -> (dtype name, shape); None in a shape matches any length; the dtype "str" is any unicode string
Spec = Mapping[str, tuple[str, tuple[int | None, ...]]]


class DamagedFile(ValueError):
    """A file that pagkit wrote cannot be read back as written: truncated, corrupt, or of the wrong content."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path} is damaged: {reason}")
        self.path = Path(path)
        self.reason = reason


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def notice(message: str) -> None:
    """One line on stderr (through tqdm when it is loaded, so that a running progress bar is not broken)."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        tqdm_module.tqdm.write(f"pagkit: {message}", file=sys.stderr)
    else:
        print(f"pagkit: {message}", file=sys.stderr, flush=True)


def array_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) over the arrays' names, dtypes, shapes and bytes, in key order."""
    import numpy as np

    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, Any]) -> None:
    """Write arrays to an ``.npz`` with their checksum (key ``checksum``), atomically."""
    import numpy as np

    if CHECKSUM_KEY in arrays:
        raise ValueError(f"{CHECKSUM_KEY!r} is reserved for the checksum")
    data = {k: np.asarray(v) for k, v in arrays.items()}
    members: dict[str, Any] = {**data, CHECKSUM_KEY: np.array(array_checksum(data))}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **members)

    atomic_write(path, write)


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (never unpickling); :class:`DamagedFile` when it cannot be read whole."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise DamagedFile(path, "not an .npz archive")
            return {k: data[k] for k in data.files}
    except DamagedFile:
        raise
    except MemoryError:
        raise
    except Exception as e:  # BadZipFile, bad CRC, zlib/struct errors, a bad .npy header, a pickled array, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise DamagedFile(path, f"unreadable ({type(e).__name__}{': ' + first if first else ''})") from e


def check_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], spec: Spec) -> None:
    """Raise :class:`DamagedFile` unless ``arrays`` has exactly the keys of ``spec``, with its dtypes and shapes."""
    import numpy as np

    missing = sorted(set(spec) - set(arrays))
    if missing:
        raise DamagedFile(path, f"missing {', '.join(missing)}")
    extra = sorted(set(arrays) - set(spec))
    if extra:
        raise DamagedFile(path, f"unexpected {', '.join(extra)}")
    for key, (dtype, shape) in spec.items():
        a = arrays[key]
        if dtype == "str":
            if a.dtype.kind != "U":
                raise DamagedFile(path, f"{key} is {a.dtype}, expected a string")
        elif a.dtype != np.dtype(dtype):
            raise DamagedFile(path, f"{key} is {a.dtype}, expected {dtype}")
        if a.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(a.shape, shape, strict=True)
        ):
            want_text = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
            raise DamagedFile(path, f"{key} has shape {list(a.shape)}, expected {want_text}")


def load_arrays(path: str | os.PathLike[str], spec: Spec) -> dict[str, np.ndarray]:
    """The arrays of a file written by :func:`save_arrays`, checked against ``spec`` and their checksum.

    Raises :class:`DamagedFile` (format, keys, dtypes, shapes or checksum) or ``FileNotFoundError``."""
    arrays = read_npz(path)
    stored = arrays.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise DamagedFile(path, "no checksum (written by an older pagkit, or edited)")
    if stored.shape != () or stored.dtype.kind != "U":
        raise DamagedFile(path, "malformed checksum")
    check_arrays(path, arrays, spec)
    if array_checksum(arrays) != str(stored):
        raise DamagedFile(path, "content does not match its checksum")
    return arrays


def set_aside(path: str | os.PathLike[str], reason: str, what: str = "file") -> Path:
    """Rename a damaged file to ``<name>.damaged`` (``.damaged-2``, ...), say so in one line; return the new path."""
    path = Path(path)
    target = path.with_name(path.name + ".damaged")
    k = 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.damaged-{k}")
    os.replace(path, target)
    notice(f"{what} {path} is damaged ({reason}); set aside as {target.name}, recomputing it")
    return target


def free_bytes(folder: str | os.PathLike[str]) -> int | None:
    """Free disk space under ``folder`` (None when unknown)."""
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def available_memory() -> int | None:
    """Memory available to new allocations, from ``/proc/meminfo`` (None when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(nbytes: int, what: str) -> None:
    """Raise ``ValueError`` (a one-line error) when ``nbytes`` clearly cannot be held in memory."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise ValueError(f"{what} needs {human_bytes(nbytes)} of memory, {human_bytes(available)} is available")
