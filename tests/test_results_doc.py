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
