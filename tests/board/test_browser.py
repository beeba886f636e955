"""The board end to end in a real headless browser (Playwright driving Debian's chromium): launch a tiny-model recipe
from the form (an error shown at its field first), watch its loss curve grow while it trains, stop a second run,
compare the two, and look at the sweeps and methods pages. Real `tunelab run` processes on the tiny Llama.
Screenshots of each page go to $TUNELAB_SCREENSHOTS (docs/ regenerates them: see docs/board.md).

Skips with the reason where chromium or Playwright is missing (.ci/run installs both)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SHOTS = os.environ.get("TUNELAB_SCREENSHOTS")


def chromium_or_skip() -> str:
    from tunelab.track.report import find_chromium

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH (Debian package `chromium`): cannot drive the board in a browser")
    return exe


@pytest.fixture()
def server(tmp_path, tiny_model_dir):
    import uvicorn

    from tunelab.board.app import create_app

    root = tmp_path / "runs"
    root.mkdir()
    make_sweep(tmp_path, root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(root, poll_s=0.3)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    app.state.board.queue.shutdown(stop_runs=True)
    srv.should_exit = True
    thread.join(timeout=10)


def make_sweep(tmp_path: Path, root: Path) -> None:
    """A finished two-objective sweep under the root (trials by the sweep tests' fake runner), for the Sweeps page."""
    from tunelab.sweep.spec import parse_sweep
    from tunelab.sweep.study import run_sweep

    fake = [sys.executable, str(Path(__file__).parents[1] / "sweep" / "fake_run.py")]
    sr = parse_sweep({"name": "sweep-demo", "output_dir": str(root),
                      "base": {"name": "b", "model": {"name_or_path": "x"}, "train": {"max_steps": 3, "lr": 0.01}},
                      "space": {"train.lr": {"choices": [0.01, 0.03, 0.06]},
                                "method": {"lora": {"r": {"choices": [2, 8]}}, "ia3": {}}},
                      "objectives": ["eval.exact_match:max", "train.peak_memory_mb:min"], "trials": 5,
                      "sampler": {"name": "random", "seed": 3}})
    run_sweep(sr, launcher=fake, poll_s=0.05, echo=lambda s: None)


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"board-{name}.png"), full_page=False)


def fill_form(page, model_dir: Path, name: str, steps: int) -> None:
    page.fill('[data-path="name"]', name)
    page.fill('[data-path="model.name_or_path"]', str(model_dir))
    page.fill('[data-path="data.train.n"]', "64")
    page.fill('[data-path="data.eval.n"]', "8")
    page.fill('[data-path="data.max_length"]', "96")
    page.fill('[data-path="train.max_steps"]', str(steps))
    page.fill('[data-path="train.batch_size"]', "4")
    page.fill('[data-path="train.lr"]', "0.01")
    page.select_option('[data-path="train.precision"]', "fp32")
    page.fill('[data-path="eval.max_new_tokens"]', "4")
    page.fill('[data-path="eval.batch_size"]', "8")
    page.fill('[data-path="method.r"]', "4")


def test_board_in_a_browser(server, tiny_model_dir):
    exe = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    url, root = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.set_default_timeout(120_000)  # a shared 2-core machine: validation and runs take their time
        expect.set_options(timeout=120_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/#/launch")

        # 1. the form: a bad value is shown at its field, and nothing is launched
        page.wait_for_selector('[data-path="train.lr"]')
        fill_form(page, tiny_model_dir, "tiny-a", 40)
        page.fill('[data-path="method.r"]', "0")
        page.click("#preview-btn")
        error = page.locator('.field-error[data-for="method.r"]')
        expect(error).to_contain_text("greater than or equal to 1")
        shot(page, "launch")
        assert not any(root.glob("tiny-a*"))

        # 2. fixed, previewed and launched: the run page's loss curve grows while it trains
        page.fill('[data-path="method.r"]', "4")
        page.click("#preview-btn")
        page.wait_for_function("document.querySelector('#yaml-preview').value.includes('name: tiny-a')")
        assert "max_steps: 40" in page.input_value("#yaml-preview")
        page.click("#launch-btn")
        page.wait_for_url("**/#/run/tiny-a")
        page.wait_for_function("+document.querySelector('#chart-loss').dataset.points > 0", timeout=180_000)
        first = int(page.get_attribute("#chart-loss", "data-points"))
        page.wait_for_function(f"+document.querySelector('#chart-loss').dataset.points > {first}", timeout=120_000)
        shot(page, "run-live")
        expect(page.locator("#run-status")).to_contain_text("finished", timeout=300_000)
        expect(page.locator("#evals-table")).to_contain_text("exact_match")
        assert "name: tiny-a" in page.inner_text("#recipe-yaml")
        shot(page, "run")

        # 3. a second run, stopped mid-way from its page
        page.goto(url + "/#/launch")
        page.wait_for_selector('[data-path="train.lr"]')
        fill_form(page, tiny_model_dir, "tiny-b", 5000)
        page.fill('[data-path="train.save_every"]', "5")
        page.click("#launch-btn")
        page.wait_for_url("**/#/run/tiny-b")
        page.wait_for_function("+document.querySelector('#chart-loss').dataset.points >= 6", timeout=180_000)
        page.click("#stop-btn")
        expect(page.locator("#run-status")).to_contain_text("stopped", timeout=60_000)
        expect(page.locator("#resume-btn")).to_be_enabled()
        assert not (root / "tiny-b" / "summary.json").exists()

        # 4. the runs table, both runs ticked and compared (tunelab report's page)
        page.goto(url + "/#/runs")
        row_a, row_b = page.locator('tr[data-run="tiny-a"]'), page.locator('tr[data-run="tiny-b"]')
        expect(row_a.locator(".status-cell")).to_contain_text("finished")
        expect(row_b.locator(".status-cell")).to_contain_text("stopped")
        row_a.locator("input.pick").check()
        row_b.locator("input.pick").check()
        shot(page, "runs")
        page.click("#compare-btn")
        frame = page.frame_locator("#compare-frame")
        expect(frame.locator("table#runs")).to_contain_text("tiny-a")
        expect(frame.locator("table#runs")).to_contain_text("tiny-b")
        expect(frame.locator('img[alt="loss curves"]')).to_be_visible()
        shot(page, "compare")

        # 5. sweeps (the front of a finished sweep) and the method catalogue
        page.goto(url + "/#/sweeps")
        expect(page.locator('[data-sweep="sweep-demo"] table.front')).to_contain_text("sweep-demo/trials/trial-")
        expect(page.locator('[data-sweep="sweep-demo"]')).to_contain_text("5 trials")
        shot(page, "sweeps")
        page.goto(url + "/#/methods")
        expect(page.locator("#methods-table")).to_contain_text("arxiv.org/abs/2106.09685")
        shot(page, "methods")
        assert errors == []
        browser.close()
