"""Start-up: ``pagkit --help`` and argument errors import no torch (the import graph, not a timing); one
``--threads`` with one meaning on every command; every option has a help text; the lazy package namespaces."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

import pagkit
from pagkit.cli import main
from pagkit.threads import AUTO, ThreadsType, auto_threads, parse_threads

HEAVY = ("torch", "diffusers", "transformers", "numpy", "safetensors", "tqdm", "PIL")


def imported_modules(args: list[str], cwd: Path) -> tuple[int, set[str], str]:
    """Run ``python -X importtime -m pagkit ARGS``; return its exit code, every module it imported, its output."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pagkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    modules = set()
    other = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "imported package":
                modules.add(name)
        else:
            other.append(line)
    return proc.returncode, modules, proc.stdout + "\n".join(other)


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


@pytest.mark.parametrize(
    "args,code,says",
    [
        (["--help"], 0, "Commands:"),
        (["--version"], 0, "0.1.0"),
        (["sample", "--help"], 0, "--threads"),
        (["eval", "--help"], 0, "--data-dir"),
        (["restore", "--help"], 0, "--task"),
        (["sample", "--label", "12", "--out", "x.png"], 2, "Invalid value for '--label'"),
        (["sample", "--n", "0", "--out", "x.png"], 2, "Invalid value for '--n'"),
        (["sample", "--pag-scale", "nan", "--out", "x.png"], 2, "must be a finite number"),
        (["sample", "--pag-layers", "", "--out", "x.png"], 2, "--pag-layers is empty"),
        (["sample", "--out", "x.jpg"], 2, "must end in .png or .npz"),
        (["sample", "--threads", "0", "--out", "x.png"], 2, "Invalid value for '--threads'"),
        (["sample", "--seed", str(2**40), "--out", "x.png"], 2, "Invalid value for '--seed'"),
        (["restore", "--task", "denoise", "--out", "x.png"], 2, "Invalid value for '--task'"),
        (["eval", "--configs", "none", "--out", "o", "--steps", "0"], 2, "Invalid value for '--steps'"),
        (["eval", "--configs", "bogus:2", "--out", "o"], 2, "unknown guidance 'bogus'"),
        (["train", "--threads", "-1"], 2, "Invalid value for '--threads'"),
        (["demo", "--out", "x.npz"], 2, "must end in .png"),
        (["bench", "--steps", "0"], 2, "Invalid value for '--steps'"),
    ],
)
def test_help_and_argument_errors_import_nothing_heavy(tmp_path: Path, args: list[str], code: int, says: str) -> None:
    returned, modules, output = imported_modules(args, tmp_path)
    assert returned == code, output
    assert says in output, output
    heavy = top_level(modules) & set(HEAVY)
    assert not heavy, f"pagkit {' '.join(args)} imported {sorted(heavy)}"
    assert "Traceback" not in output
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_import_graph_check_sees_heavy_imports(tmp_path: Path) -> None:
    """The check above can fail: a command that samples does import torch."""
    code, modules, output = imported_modules(["layers", "--weights", str(tmp_path / "missing.safetensors")], tmp_path)
    assert code == 2 and "not found" in output, output
    assert "torch" in top_level(modules)


def test_importing_pagkit_loads_no_torch() -> None:
    code = (
        "import sys, pagkit, pagkit.eval, pagkit.inverse, pagkit.cli\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_lazy_exports_resolve() -> None:
    assert set(pagkit.__all__) == set(pagkit._EXPORTS)
    for name in pagkit.__all__:
        assert getattr(pagkit, name) is not None
        assert name in dir(pagkit)
    with pytest.raises(AttributeError, match="no_such_name"):
        pagkit.no_such_name  # noqa: B018
    importlib.import_module("pagkit.inverse.restore")  # binds nothing over the package's restore()
    from pagkit.inverse import TASKS, restore

    assert callable(restore) and not isinstance(restore, type(pagkit))  # the function, not the submodule
    for package in (importlib.import_module("pagkit.eval"), importlib.import_module("pagkit.inverse")):
        for name in package.__all__:
            assert getattr(package, name) is not None
    from pagkit.inverse.cli import TASK_NAMES

    assert tuple(sorted(TASKS)) == TASK_NAMES  # the command line's --task list is the registry


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


def test_every_option_has_a_help_text() -> None:
    missing = [
        f"{name} {opt.opts[0]}"
        for name, command in main.commands.items()
        for opt in _options(command)
        if not opt.help and not opt.hidden
    ]
    assert not missing, missing


def test_one_threads_option_everywhere() -> None:
    sampling = {"sample", "demo", "eval", "restore"}
    for name, command in main.commands.items():
        opts = {o.name: o for o in _options(command)}
        if name in ("layers", "guidance"):  # listings: no sampling, no threads
            continue
        threads = opts["threads"]
        assert isinstance(threads.type, ThreadsType) and threads.default == AUTO, name
        assert "--no-progress" in [s for o in opts.values() for s in o.opts] or name == "bench", name
        if name in sampling:
            assert "device" in opts, name


def test_threads_values() -> None:
    assert parse_threads("auto") is None and parse_threads(None) is None
    assert parse_threads("3") == 3 and parse_threads(2) == 2
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="auto or a whole number"):
            parse_threads(bad)
    # auto: the idle cores, shared among torchrun's local processes, at least 1; OMP_NUM_THREADS wins
    assert auto_threads({}, cores=lambda: 8, busy=lambda: 0) == 8
    assert auto_threads({}, cores=lambda: 2, busy=lambda: 1) == 1  # another process is busy: no oversubscription
    assert auto_threads({}, cores=lambda: 2, busy=lambda: 5) == 1
    assert auto_threads({"LOCAL_WORLD_SIZE": "2"}, cores=lambda: 8, busy=lambda: 0) == 4
    assert auto_threads({"OMP_NUM_THREADS": "3"}, cores=lambda: 8, busy=lambda: 0) == 3


def test_threads_option_sets_torch_threads(tmp_path: Path) -> None:
    import torch
    from click.testing import CliRunner

    from tiny import write_tiny_denoiser

    weights = write_tiny_denoiser(tmp_path / "d.safetensors")
    out = tmp_path / "s.npz"
    try:
        args = ["sample", "--weights", str(weights), "--n", "1", "--steps", "1", "--threads", "2", "--out", str(out)]
        result = CliRunner().invoke(main, [*args, "--no-progress"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
