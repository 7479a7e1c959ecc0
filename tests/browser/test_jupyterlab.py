"""A newcomer's path in a real browser: JupyterLab, every notebook, Run All Cells; a chat in 00.

Headless Debian Chromium driven by Playwright (Playwright's own browser download is not used).
JupyterLab runs on a free local port with a token, on *copies* of the notebooks so autosave
never writes outputs into the committed files. Every notebook must run with no error output,
no widget that failed to render ("Click to show javascript error", "Error displaying widget",
"Failed to create view") and no console error from the widget manager. Hindi text must render
with a real Devanagari font (not boxes).

Nothing is written into the repository: screenshots go to out/browser/ (ignored), the welcome
one to $SPARK_LAB_SCREENSHOT when set (`scripts/browser_test.sh --screenshot` sets it to
docs/screenshot.png, to refresh the README's picture on purpose). Run it with
scripts/browser_test.sh.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
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
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
OUT = Path(os.environ.get("SPARK_LAB_BROWSER_OUT", ROOT / "out" / "browser"))   # ignored by git
# what the widget manager shows or logs when a widget cannot be drawn
WIDGET_ERRORS = ("Click to show javascript error", "Error displaying widget", "Failed to create view",
                 "Could not create a view", "Error rendering widget")
WIDGET_CONSOLE = re.compile(r"widget|Failed to create view|Could not create|model not found", re.I)
QUESTION = "What is the capital of Japan?"   # in tests/data/demo_questions.json: answered at seed 0
RUN_ALL_TIMEOUT = float(os.environ.get("SPARK_LAB_RUN_ALL_TIMEOUT", 600))   # seconds, per notebook
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
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, root / name)
    # beside the copies, the rest of the checkout (read-only use: tests/fixtures, docs, ...), so a
    # notebook that finds the repository from its folder finds it here as in `make lab`
    for entry in ROOT.iterdir():
        if entry.name not in ("notebooks", ".git", ".venv", "out") and not (tmp / entry.name).exists():
            (tmp / entry.name).symlink_to(entry)
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
        pg.console_errors = []      # (kind, text) of console errors and uncaught page errors
        pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(("console", m.text)))
        pg.on("pageerror", lambda e: pg.console_errors.append(("pageerror", str(e))))
        try:
            yield pg
        finally:
            ctx.close()


def _kernel_states(base, token):
    # jupyter_server answers 500 to a kernel listing that lands while a kernel is being created (its
    # model has no last_activity yet: TraitError in list_kernels): ask again, a few seconds at most
    for attempt in range(20):
        try:
            return [k.get("execution_state") for k in _get_json(f"{base}/api/kernels?token={token}")]
        except urllib.error.HTTPError as e:
            if e.code != 500 or attempt == 19:
                raise
            time.sleep(0.25)


def _shut_down_kernels(base, token):
    """Stop every kernel, so the next notebook starts alone (CI has two cores)."""
    for k in _get_json(f"{base}/api/kernels?token={token}"):
        req = urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()
    deadline = time.time() + 30
    while _kernel_states(base, token) and time.time() < deadline:
        time.sleep(0.5)


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
    out = Path(os.environ.get("SPARK_LAB_SCREENSHOT") or OUT / name)
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
    _shut_down_kernels(base, token)
    page.console_errors.clear()
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
    OUT.mkdir(parents=True, exist_ok=True)                             # for diagnosis: the last view,
    panel.screenshot(path=str(OUT / f"{Path(name).stem}.png"))          # and each plot as it was drawn
    for i, plot in enumerate(panel.locator(".js-plotly-plot").all()):
        plot.screenshot(path=str(OUT / f"{Path(name).stem}-plot{i + 1}.png"))
    return time.time() - t0, error_text, prompts, panel


def _widget_problems(page, panel) -> list[str]:
    """Widgets that failed to render, and the widget manager's console errors."""
    problems = [f"{n} error widget(s) (.jupyter-widgets-error-widget)"
                for n in [panel.locator(".jupyter-widgets-error-widget").count()] if n]
    text = panel.inner_text()
    problems += [f"the notebook shows {marker!r}" for marker in WIDGET_ERRORS if marker in text]
    deadline = time.time() + 10         # a widget view still loading after the run is one that never draws
    while "Loading widget..." in panel.inner_text() and time.time() < deadline:
        time.sleep(0.5)
    if "Loading widget..." in panel.inner_text():
        problems.append("a widget stayed at 'Loading widget...'")
    problems += [f"{kind}: {msg[:300]}" for kind, msg in page.console_errors if WIDGET_CONSOLE.search(msg)]
    return problems


def _assert_ran_cleanly(name, error_text, prompts, page=None, panel=None):
    assert "Error" not in error_text and "Traceback" not in error_text, f"a cell of {name} failed:\n{error_text}"
    assert prompts and all(any(ch.isdigit() for ch in p) for p in prompts), f"{name}: cells not run: {prompts}"
    if page is not None:
        others = [m for m in page.console_errors if not WIDGET_CONSOLE.search(m[1])]
        if others:
            print(f"\n{name}: other console errors (not failing): {others[:5]}")
        problems = _widget_problems(page, panel)
        assert not problems, f"{name}: widgets did not render:\n" + "\n".join(problems)


def test_welcome_runs_and_chat_streams(lab, page):
    # 1. open 00_welcome, Run → Run All Cells
    base, token, root, log_path = lab
    run_all_s, error_text, prompts, panel = _open_and_run_all(page, base, token, NOTEBOOK)
    # (asserted at the end, so that a failing later cell still lets the chat and the screenshot be checked)

    # 2. the chat box: type a question, press Send, watch the answer grow
    box = page.locator(".spark-chat-input input").first
    box.scroll_into_view_if_needed()
    box.fill(QUESTION)
    # every length the answer takes, recorded in the page as the DOM changes: polling from here
    # can miss them all on a fast machine (a 7-token answer streams in a quarter of a second)
    page.evaluate("""() => {
        window.__answerLengths = [];
        const t = document.querySelector('.spark-chat-transcript');
        new MutationObserver(() => {
            const a = t.querySelectorAll('div.spark-assistant');
            if (!a.length) return;
            const n = a[a.length - 1].innerText.replace('\u25ae', '').trim().length;
            const seen = window.__answerLengths;
            if (n && (!seen.length || seen[seen.length - 1] !== n)) seen.push(n);
        }).observe(t, {subtree: true, childList: true, characterData: true});
    }""")
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
    observed = page.evaluate("() => window.__answerLengths")
    if len(observed) > len(lengths):
        lengths = observed
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
    _assert_ran_cleanly(NOTEBOOK, error_text, prompts, page, panel)
    # the gallery drew its picture and its thumbnail (a failed ImageView shows no <img>)
    assert panel.locator(".widget-image").count() >= 2, "the ImageGallery's preview and thumbnail are missing"


def test_memory_notebook_draws_its_figures(lab, page):
    """01_device_and_memory: every plot renders, the live dashboard (a plotly FigureWidget) included."""
    base, token, root, log_path = lab
    run_s, error_text, prompts, panel = _open_and_run_all(page, base, token, "01_device_and_memory.ipynb")
    _assert_ran_cleanly("01_device_and_memory.ipynb", error_text, prompts, page, panel)
    plots = panel.locator(".js-plotly-plot")
    assert plots.count() >= 3, f"expected the timeline, the dashboard and the plan table; saw {plots.count()} plots"
    # the dashboard's traces reached the browser: one line per tag plus "in use"
    legend = panel.locator(".js-plotly-plot", has_text="in use").first.inner_text()
    assert "weights" in legend and "kv_cache" in legend
    print(f"\n01_device_and_memory: run all {run_s:.1f} s, {plots.count()} plots drawn")


OTHERS = [n for n in NOTEBOOKS if n not in (NOTEBOOK, "01_device_and_memory.ipynb")]


@pytest.mark.parametrize("name", OTHERS)
def test_notebook_runs_in_jupyterlab(lab, page, name):
    """Every other notebook: Run All Cells, no error output, every widget drawn."""
    base, token, root, log_path = lab
    run_s, error_text, prompts, panel = _open_and_run_all(page, base, token, name)
    _assert_ran_cleanly(name, error_text, prompts, page, panel)
    print(f"\n{name}: run all {run_s:.1f} s, {len(prompts)} code cells, "
          f"{panel.locator('.jupyter-widgets').count()} widget views, {panel.locator('.js-plotly-plot').count()} plots")


# Hindi: a conjunct such as "क्ष" (three code points: ka, virama, ssa) is one glyph about as wide
# as "क" in a Devanagari font; without one, every code point is a same-width box (tofu).
_MEASURE = """([text, family]) => {
    const s = document.createElement("span");
    s.style.fontFamily = family; s.style.fontSize = "40px"; s.style.whiteSpace = "pre";
    s.textContent = text; document.body.appendChild(s);
    const w = s.getBoundingClientRect().width; s.remove(); return w;
}"""


def test_hindi_renders_with_a_devanagari_font(lab, page):
    """Notebook 05 prints Hindi; the page's fonts must have Devanagari glyphs, not boxes."""
    base, token, root, log_path = lab
    page.goto(f"{base}/lab?token={token}")
    page.locator(".jp-LabShell").wait_for()
    for family in ("var(--jp-content-font-family)", "var(--jp-code-font-family)"):
        ka = page.evaluate(_MEASURE, ["\u0915", family])                    # क
        ksa = page.evaluate(_MEASURE, ["\u0915\u094d\u0937", family])      # क्ष
        hi = page.evaluate(_MEASURE, ["\u092d\u093e\u0930\u0924", family])  # भारत: four letters
        boxes = page.evaluate(_MEASURE, ["\u0378\u0378\u0378\u0378", family])  # unassigned: four boxes
        assert ka > 0 and ksa < 1.8 * ka, \
            (f"Devanagari renders as boxes in {family} (क {ka:.0f}px, क्ष {ksa:.0f}px): install a Devanagari "
             f"font (Debian: fonts-noto-core; scripts/browser_test.sh does)")
        assert abs(hi - boxes) > 1, f"Hindi is as wide as four boxes in {family} ({hi:.0f}px)"


def test_a_broken_widget_is_caught(lab, page):
    """The checks themselves: a widget the installed front end cannot draw (an Image with a tooltip,
    as ImageGallery's thumbnails once were) must be reported, so a pass above means something."""
    import nbformat
    base, token, root, log_path = lab
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import ipywidgets as w\nw.Image(value=b'', format='png', tooltip='x')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "zz_broken_widget.ipynb")
    run_s, error_text, prompts, panel = _open_and_run_all(page, base, token, "zz_broken_widget.ipynb")
    problems = _widget_problems(page, panel)
    assert any("error widget" in p for p in problems) and any("Click to show javascript error" in p for p in problems), problems
    assert any(p.startswith("console: Could not create a view") for p in problems), problems
    _shut_down_kernels(base, token)
