"""`make lab` works: JupyterLab from the venv starts on notebooks/, serves /lab, and stops cleanly."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).parent / "jupyter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None  # not listening yet


def test_jupyter_lab_serves_lab(tmp_path):
    if not JUPYTER.exists():
        pytest.fail(f"{JUPYTER} is missing: `make setup` installs jupyterlab (the dev extra)")
    nb_dir = ROOT / "notebooks" if (ROOT / "notebooks").is_dir() else tmp_path
    port = free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"),  # no user config leaks in
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_PLATFORM_DIRS="1")
    log = open(tmp_path / "lab.log", "w+")
    proc = subprocess.Popen(
        [str(JUPYTER), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--notebook-dir={nb_dir}", "--ServerApp.token=", "--ServerApp.password=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # CI containers run as root
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        status, deadline = None, time.monotonic() + 60
        while status != 200 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.25)
            status = get_status(f"http://127.0.0.1:{port}/lab")
        log.seek(0)
        assert status == 200, f"/lab answered {status}; exit code {proc.poll()}; log:\n{log.read()[-3000:]}"
        assert get_status(f"http://127.0.0.1:{port}/api/contents") == 200  # the notebook folder is served
    finally:
        proc.send_signal(signal.SIGTERM)  # jupyter_server shuts down cleanly on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("JupyterLab did not stop within 20 s of SIGTERM")
        log.close()
    assert proc.returncode == 0, f"JupyterLab exited with {proc.returncode} on SIGTERM"
    assert get_status(f"http://127.0.0.1:{port}/lab") is None  # nothing left listening


def test_conda_and_binder_files():
    """environment.yml (conda-forge, CPU) and binder/ (runtime only, installs the kit and the default models)."""
    yaml = pytest.importorskip("yaml")
    root_env = yaml.safe_load((ROOT / "environment.yml").read_text())
    binder_env = yaml.safe_load((ROOT / "binder" / "environment.yml").read_text())
    for env in (root_env, binder_env):
        assert env["channels"] == ["conda-forge"]
        deps = [d for d in env["dependencies"] if isinstance(d, str)]
        assert any(d.startswith("python") for d in deps) and "pip" in deps
        assert not any(("cupy" in d or "torch" in d) for d in deps)  # CPU by default; Binder has ~2 GB
    assert "python>=3.10" in root_env["dependencies"]
    pip_root = next(d["pip"] for d in root_env["dependencies"] if isinstance(d, dict))
    assert pip_root == ['-e ".[lab]"']                     # the lab; `make test` adds .[dev] and torch
    assert "# - -e \".[lab,cuda13]\"" in (ROOT / "environment.yml").read_text()

    post = ROOT / "binder" / "postBuild"
    assert os.access(post, os.X_OK)
    text = post.read_text()
    assert "pip install --no-cache-dir \".[lab]\"" in text and "-e " not in text and "torch" not in text.split("#")[0]
    makefile_models = (ROOT / "Makefile").read_text().split("MODELS :=")[1].split("\nPORT")[0]
    for pkg in makefile_models.replace("\\", " ").split():   # the same default models as `make setup`
        assert pkg in text
    lines = [l for l in text.splitlines() if l.startswith("python -m spark_lab.")]
    assert "--no-deps" in text and [l.split()[2] for l in lines] == ["spark_lab.models", "spark_lab.warmup"]
