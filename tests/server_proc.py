"""A spark_lab server in a subprocess for tests: its memory and crashes stay its own."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading

import pytest


@contextlib.contextmanager
def server_process(code: str, *args: str, start_timeout: float = 120):
    """Run `python -c code *args`, which prints "READY <base url>" once it listens -> (url, pid)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               SPARK_LAB_THREADS=os.environ.get("SPARK_LAB_THREADS", "1"))
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    line = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=start_timeout)
    try:
        if not line or not line[0].startswith("READY"):
            proc.kill()
            log.seek(0)
            pytest.fail(f"server did not start: {log.read().decode()[-2000:]}")
        yield line[0].split()[1], proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
