"""docs/results.md carries exact copies of the committed eval reports (no hand-edited numbers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" / "results_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_doc_tables_match_the_reports() -> None:
    doc = (ROOT / "docs" / "results.md").read_text()
    assert "<!-- table:" in doc
    assert _module().refresh(doc, ROOT / "docs" / "results") == doc, "run: python scripts/results_doc.py"


def test_refresh_fills_and_flags_missing_reports(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.md").write_text("| x | 1 |\n")
    doc = "t\n<!-- table:a -->\nold\n<!-- /table -->\n<!-- table:b -->\n<!-- /table -->\n"
    out = _module().refresh(doc, tmp_path)
    assert "<!-- table:a -->\n| x | 1 |\n<!-- /table -->" in out
    assert "not run yet" in out and "old" not in out


def test_headline_picks_the_best_pag_only_config(tmp_path: Path) -> None:
    import json

    rows = [
        {"name": "none", "fid": 10.0, "is_mean": 2.0},
        {"name": "pag:3", "fid": 8.0, "is_mean": 2.5},
        {"name": "pag:5~interval:0:0.5", "fid": 7.0, "is_mean": 2.6},
        {"name": "cfg:2+pag:1", "fid": 1.0, "is_mean": 9.0},  # not PAG alone
        {"name": "pag:3%2", "fid": 2.0, "is_mean": 9.0},  # cached delta: not counted
    ]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "results.json").write_text(
        json.dumps({"settings": {"sampler": "ddim", "steps": 10}, "configs": rows})
    )
    doc = "<!-- headline:s,missing -->\nold\n<!-- /headline -->\n"
    out = _module().refresh(doc, tmp_path)
    assert "| s | DDIM 10 | 10.00 | `pag:5~interval:0:0.5` | 7.00 | -30.0% | 2.00 -> 2.60 |" in out
    assert "| missing | (not run yet)" in out and "old" not in out
