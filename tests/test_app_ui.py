"""``pagkit ui`` in a real headless browser (Debian's chromium driven by Playwright): the page loads, a click shows
the unguided and guided images, a bad value shows its error in the page and the page keeps working, the sweep
fills the gallery. The page runs on a tiny random denoiser with few steps, so the whole test takes seconds."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from tiny import write_tiny_denoiser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pagkit.app.ui import EmbeddedBackend, build_page

    weights = write_tiny_denoiser(tmp_path_factory.mktemp("ui") / "d.safetensors")
    backend = EmbeddedBackend(weights=str(weights), device="cpu")
    backend.default_steps = 3
    page = build_page(backend)
    port = _free_port()
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


@pytest.mark.timeout(120)
def test_page_in_a_headless_browser(page_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 900})
            tab.goto(page_url)
            expect(tab.get_by_text("pagkit: perturbed-attention guidance")).to_be_visible(timeout=30_000)
            expect(tab.locator("#layers")).to_contain_text("mid_block.attentions.0")  # filled from list_layers

            tab.locator("#generate").click()
            expect(tab.locator("#status")).to_contain_text("Guided: pag:3@[mid_block.attentions.0]", timeout=30_000)
            expect(tab.locator("#unguided img")).to_have_count(1)
            expect(tab.locator("#guided img")).to_have_count(1)
            assert tab.locator("#unguided img").get_attribute("src") != tab.locator("#guided img").get_attribute("src")

            tab.locator("#extra textarea").fill("bogus:2")  # a bad setting: its error shows in the page
            tab.locator("#generate").click()
            expect(tab.locator("#status")).to_contain_text("Error:", timeout=30_000)
            expect(tab.locator("#status")).to_contain_text("bogus")

            tab.locator("#extra textarea").fill("")  # the page keeps working
            tab.locator("#scales textarea").fill("0,4")
            tab.locator("#sweep").click()
            expect(tab.locator("#status")).to_contain_text("Sweep over PAG scales 0, 4", timeout=30_000)
            expect(tab.locator("#gallery img")).to_have_count(2)
            tab.locator("#generate").click()
            expect(tab.locator("#status")).to_contain_text("Guided:", timeout=30_000)
            expect(tab.locator("#guided img")).to_have_count(1)
        finally:
            browser.close()


def test_guidance_spec_of_the_controls() -> None:
    from pagkit.app.ui import guidance_spec, parse_scales

    assert guidance_spec(1.0, 0.0, [], "") == "none"
    assert guidance_spec(4.0, 3.0, ["mid_block.attentions.0"], "seg:2") == "cfg:4+pag:3@[mid_block.attentions.0]+seg:2"
    with pytest.raises(ValueError, match="no layer is picked"):
        guidance_spec(1.0, 3.0, [], "")
    assert parse_scales("0, 1.5,3") == [0.0, 1.5, 3.0]
    with pytest.raises(ValueError, match="numbers separated by commas"):
        parse_scales("a,b")


def test_pipeline_backend_runs_a_saved_pipeline(tmp_path: Path) -> None:
    from pagkit.app.ui import PipelineBackend
    from pagkit.testing.saved import save_pipeline

    backend = PipelineBackend(str(save_pipeline("sd15", tmp_path / "sd")), device="cpu")
    assert backend.condition == "prompt" and backend.default_layers
    cond = {"prompt": "a cat", "negative_prompt": "", "class": None}
    left = backend.run("none", cond, 0, 2)
    right = backend.run(f"cfg:4+pag:3@[{','.join(backend.default_layers)}]", cond, 0, 2)
    assert left.size == right.size and left.size[0] >= 128
    assert left.tobytes() != right.tobytes()
