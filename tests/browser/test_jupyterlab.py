"""A newcomer's path in a real browser: JupyterLab, 00_welcome.ipynb, Run All Cells, then a chat.

Headless Debian Chromium driven by Playwright (Playwright's own browser download is not used).
JupyterLab runs on a free local port with a token, on a *copy* of the notebook so autosave
never writes outputs into the committed file. The screenshot goes to docs/screenshot.png
(or $SPARK_LAB_SCREENSHOT). Run it with scripts/browser_test.sh.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SPARK_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
NOTEBOOK = "00_welcome.ipynb"
QUESTION = "What is the capital of France?"
RUN_ALL_TIMEOUT = float(os.environ.get("SPARK_LAB_RUN_ALL_TIMEOUT", 900))   # seconds
CHAT_TIMEOUT = float(os.environ.get("SPARK_LAB_CHAT_TIMEOUT", 300))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read().decode())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the notebook: yields (base_url, token, root_dir, log_path)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/browser_test.sh installs it with apt-get)")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, CI=os.environ.get("CI", "1"), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               SPARK_LAB_THREADS=os.environ.get("SPARK_LAB_THREADS", "1"),
               JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               IPYTHONDIR=str(tmp / "ipython"))
    log_path = tmp / "jupyterlab.log"
    # no "Would you like to get notified about official Jupyter news?" toast over the screenshot
    note = tmp / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    note.parent.mkdir(parents=True)
    note.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
           "--ServerApp.port_retries=0", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.user_settings_dir={tmp / 'settings'}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")          # CI containers run as root
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                _get_json(f"{base}/api/status?token={token}")
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"JupyterLab did not answer on {base} within 120 s")
                time.sleep(0.5)
        yield base, token, root, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page(lab, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        pg = ctx.pages[0] if ctx.pages else ctx.new_page()
        pg.set_default_timeout(60_000)
        try:
            yield pg
        finally:
            ctx.close()


def _kernel_states(base, token):
    return [k.get("execution_state") for k in _get_json(f"{base}/api/kernels?token={token}")]


def _wait_until_idle(page, base, token, timeout):
    """The kernel reports idle and no cell is queued or running ("[*]"), steadily for 3 s."""
    deadline, calm_since = time.time() + timeout, None
    while time.time() < deadline:
        busy = page.locator(".jp-Cell .jp-InputPrompt", has_text="*").count()
        states = _kernel_states(base, token)
        if states and all(s == "idle" for s in states) and busy == 0:
            calm_since = calm_since or time.time()
            if time.time() - calm_since > 3:
                return
        else:
            calm_since = None
        time.sleep(1)
    raise AssertionError(f"the notebook did not finish within {timeout:.0f} s")


def _shot(page, name="screenshot.png"):
    out = Path(os.environ.get("SPARK_LAB_SCREENSHOT", ROOT / "docs" / name))
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    return out


def _tidy(page):
    """Close the "Jupyter news?" toast and the file browser, so the screenshot shows the notebook."""
    no = page.get_by_role("button", name="No", exact=True)
    if no.count():
        no.first.click()
    current = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if current.count():
        current.first.click()     # clicking the open panel's tab collapses the sidebar


def test_welcome_runs_and_chat_streams(lab, page):
    base, token, root, log_path = lab
    t0 = time.time()
    page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
    page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for()
    # the kernel must be up before Run All (a kernel-selection dialog would mean it is not)
    deadline = time.time() + 120
    while not _kernel_states(base, token) and time.time() < deadline:
        time.sleep(0.5)
    assert _kernel_states(base, token), "no kernel started for the notebook"

    # 1. Run → Run All Cells
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    page.locator(".jp-Cell .jp-InputPrompt", has_text="*").first.wait_for(timeout=30_000)
    _wait_until_idle(page, base, token, RUN_ALL_TIMEOUT)
    run_all_s = time.time() - t0
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    error_text = "\n".join(errors.all_inner_texts())[-3000:]
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
    # (asserted at the end, so that a failing later cell still lets the chat and the screenshot be checked)

    # 2. the chat box: type a question, press Send, watch the answer grow
    box = page.locator(".spark-chat-input input").first
    box.scroll_into_view_if_needed()
    box.fill(QUESTION)
    page.locator(".spark-chat-send").first.click()
    answer = page.locator(".spark-chat-transcript div.spark-assistant").last
    answer.wait_for(timeout=30_000)
    lengths, deadline = [], time.time() + CHAT_TIMEOUT
    status = page.locator(".spark-chat-status").first
    while time.time() < deadline:
        text = answer.inner_text().replace("\u25ae", "").strip()
        if text and (not lengths or len(text) != lengths[-1]):
            lengths.append(len(text))
        if "tok/s" in status.inner_text():
            break
        time.sleep(0.1)
    final = answer.inner_text().strip()
    assert "tok/s" in status.inner_text(), f"the answer did not finish within {CHAT_TIMEOUT:.0f} s"
    assert QUESTION in page.locator(".spark-chat-transcript").first.inner_text()
    assert final, "the answer is empty"
    assert len(lengths) >= 2 and lengths == sorted(lengths), f"answer did not stream in (lengths seen: {lengths})"
    _tidy(page)
    page.locator(".spark-chat-transcript").first.scroll_into_view_if_needed()
    time.sleep(0.5)
    shot = _shot(page)
    print(f"\nrun all: {run_all_s:.1f} s; chat answer grew through {len(lengths)} lengths: {final!r}; "
          f"status: {status.inner_text()}; screenshot: {shot}")
    assert "Error" not in error_text and "Traceback" not in error_text, f"a cell failed:\n{error_text}"
    assert prompts and all(any(ch.isdigit() for ch in p) for p in prompts), f"cells not run: {prompts}"
