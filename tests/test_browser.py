"""Headless Chromium smoke test: open the app, run one comparison, save a screenshot.

Needs Debian's chromium (`make test` installs it when missing) and the playwright package (it drives
that binary; it downloads no browser). A missing chromium fails the test loudly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, STUDIO_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the app exited before serving")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@contextlib.contextmanager
def chromium():
    """Debian's chromium driven by playwright (which downloads no browser); a missing binary fails loudly."""
    assert os.path.exists(CHROMIUM), "Debian's chromium is missing: run `make test`, which installs it"
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.browser
def test_compare_in_chromium(server):
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(server)
        page.get_by_role("tab", name="Guidance").click()
        page.get_by_label("Steps").first.fill("4")
        page.get_by_role("button", name="Compare").click()
        # three methods selected by default: wait until the measurements table has three rows
        page.wait_for_function("document.body.innerText.split(' NFE').length - 1 >= 3", timeout=180_000)
        time.sleep(1.0)
        path = os.path.join(ARTIFACTS, "guidance-tab.png")
        page.screenshot(path=path, full_page=True)
        text = page.inner_text("body")
    assert os.path.getsize(path) > 20_000
    assert "cfg_pp" in text and "seed 0" in text


@pytest.mark.browser
def test_invert_then_edit_in_chromium(server):
    """Inversion tab: invert the prompt's rendered scene; "Edit this" hands it to the Editing tab; edit it."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1200})
        page.goto(server)
        page.get_by_role("tab", name="Inversion").click()
        page.get_by_label("Steps").filter(visible=True).first.fill("8")
        page.get_by_label("null_text").filter(visible=True).uncheck()  # the slow one; ddim and negative_prompt stay
        page.get_by_role("button", name="Invert and reconstruct").click()
        # both inversions done (the table header also says "PSNR": wait for the last caption itself)
        page.wait_for_function("document.body.innerText.includes('negative-prompt inversion (§8.3) · PSNR')",
                               timeout=300_000)
        time.sleep(1.0)
        inv_path = os.path.join(ARTIFACTS, "inversion-tab.png")
        page.screenshot(path=inv_path, full_page=True)
        inv_text = page.inner_text("body")
        page.get_by_role("button", name="Edit this →").click()
        page.wait_for_function("document.body.innerText.includes('Source: negative-prompt inversion')",
                               timeout=60_000)
        page.get_by_role("button", name="Edit", exact=True).filter(visible=True).click()
        # the last method's caption is there
        page.wait_for_function("document.body.innerText.includes('masactrl · {')", timeout=300_000)
        token = page.get_by_label("Prompt token").filter(visible=True)
        token.fill("circle")
        token.press("Enter")
        before = page.evaluate("document.querySelectorAll('img').length")
        page.get_by_role("button", name="Show attention map").click()
        page.wait_for_function(f"document.querySelectorAll('img').length > {before}", timeout=120_000)
        time.sleep(2.0)
        ed_path = os.path.join(ARTIFACTS, "editing-tab.png")
        page.screenshot(path=ed_path, full_page=True)
        ed_text = page.inner_text("body")
    assert os.path.getsize(inv_path) > 20_000 and os.path.getsize(ed_path) > 20_000
    assert "DDIM inversion (§8.1)" in inv_text and "SSIM" in inv_text
    assert "source replay" in ed_text and "masactrl" in ed_text
