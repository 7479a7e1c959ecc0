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
import tempfile
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
    for name in (NOTEBOOK, "01_device_and_memory.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, root / name)
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
    # render every cell (JupyterLab 4 otherwise virtualises cells scrolled out of view)
    tracker = tmp / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
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


def _open_and_run_all(page, base, token, name):
    """Open notebooks/<name>, Run → Run All Cells, wait until done: (seconds, stderr text, prompts, panel)."""
    t0 = time.time()
    page.goto(f"{base}/lab/tree/{name}?reset&token={token}")     # reset: a fresh workspace, this notebook only
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current", has_text=name).wait_for()
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-Notebook .jp-Cell").first.wait_for()
    # the kernel must be up before Run All (a kernel-selection dialog would mean it is not)
    deadline = time.time() + 120
    while not _kernel_states(base, token) and time.time() < deadline:
        time.sleep(0.5)
    assert _kernel_states(base, token), f"no kernel started for {name}"
    # ...and connected: Run All sent while the kernel is still starting is dropped when it comes up
    page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for(timeout=120_000)
    time.sleep(1)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    panel.locator(".jp-Cell .jp-InputPrompt", has_text="*").first.wait_for(timeout=30_000)
    _wait_until_idle(page, base, token, RUN_ALL_TIMEOUT)
    errors = panel.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    error_text = "\n".join(errors.all_inner_texts())[-3000:]
    prompts = panel.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
    page.screenshot(path=str(Path(tempfile.gettempdir()) / f"spark-lab-browser-{name}.png"))  # for diagnosis
    return time.time() - t0, error_text, prompts, panel


def _assert_ran_cleanly(name, error_text, prompts):
    assert "Error" not in error_text and "Traceback" not in error_text, f"a cell of {name} failed:\n{error_text}"
    assert prompts and all(any(ch.isdigit() for ch in p) for p in prompts), f"{name}: cells not run: {prompts}"


def test_welcome_runs_and_chat_streams(lab, page):
    # 1. open 00_welcome, Run → Run All Cells
    base, token, root, log_path = lab
    run_all_s, error_text, prompts, panel = _open_and_run_all(page, base, token, NOTEBOOK)
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
    _assert_ran_cleanly(NOTEBOOK, error_text, prompts)


def test_memory_notebook_draws_its_figures(lab, page):
    """01_device_and_memory: every plot renders, the live dashboard (a plotly FigureWidget) included."""
    base, token, root, log_path = lab
    run_s, error_text, prompts, panel = _open_and_run_all(page, base, token, "01_device_and_memory.ipynb")
    _assert_ran_cleanly("01_device_and_memory.ipynb", error_text, prompts)
    plots = panel.locator(".js-plotly-plot")
    assert plots.count() >= 3, f"expected the timeline, the dashboard and the plan table; saw {plots.count()} plots"
    # the dashboard's traces reached the browser: one line per tag plus "in use"
    legend = panel.locator(".js-plotly-plot", has_text="in use").first.inner_text()
    assert "weights" in legend and "kv_cache" in legend
    print(f"\n01_device_and_memory: run all {run_s:.1f} s, {plots.count()} plots drawn")
