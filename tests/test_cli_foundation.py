"""`spark-lab info` and `spark-lab plan`, run as a user runs them (a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "spark-lab"


def spark_lab(*args, extra_env=None, pythonpath=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", SPARK_LAB_THREADS="1")
    env.pop("SPARK_LAB_DEBUG", None)
    env.update(extra_env or {})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "spark_lab.cli"]
    return subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def cupy_without_gpu(tmp_path):
    """A `cupy` package on PYTHONPATH as on a CPU-only machine: imports, but is_available() is False."""
    pkg = tmp_path / "fakecupy" / "cupy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import types\n"
        "__version__ = '0.0-fake'\n"
        "cuda = types.SimpleNamespace(is_available=lambda: False)\n")
    return pkg.parent


def test_info_cuda_asked_on_a_machine_without_one(cupy_without_gpu):
    r = spark_lab("info", extra_env={"SPARK_LAB_DEVICE": "cuda"}, pythonpath=cupy_without_gpu)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("spark-lab info: error: SPARK_LAB_DEVICE=cuda but")
    assert "Traceback" not in r.stderr


def test_info_cuda_asked_here():
    """The acceptance check as written: plain `SPARK_LAB_DEVICE=cuda spark-lab info` on this machine."""
    probe = subprocess.run([sys.executable, "-c", "from spark_lab.device import _probe_cuda; "
                            "print(_probe_cuda()[0] is not None)"], capture_output=True, text=True, timeout=60)
    if probe.stdout.strip() == "True":
        pytest.skip("this machine has a usable GPU")
    r = spark_lab("info", extra_env={"SPARK_LAB_DEVICE": "cuda"})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "SPARK_LAB_DEVICE=cuda" in r.stderr


def test_info_json_cpu(cupy_without_gpu):
    r = spark_lab("info", "--json", extra_env={"SPARK_LAB_DEVICE": "auto"}, pythonpath=cupy_without_gpu)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["device"] == "cpu" and info["name"]
    assert info["threads"] == 1 and info["cpu_cores"] >= 1
    blas = [b for b in info["blas"] if b["user_api"] == "blas"]
    assert blas and all(b["threads"] == 1 for b in blas) and blas[0]["library"]
    assert 0 < info["memory_available"] <= info["memory_total"]
    assert 0 < info["budget"] <= info["memory_available"]
    assert isinstance(info["models"], dict)


def test_info_text():
    r = spark_lab("info", extra_env={"SPARK_LAB_DEVICE": "cpu"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("device     cpu (")
    assert "blas " in r.stdout and "threads" in r.stdout


def test_bad_device_name_is_one_line():
    r = spark_lab("info", extra_env={"SPARK_LAB_DEVICE": "tpu"})
    assert r.returncode == 1 and r.stderr.strip() == (
        "spark-lab info: error: SPARK_LAB_DEVICE='tpu' is not one of auto, cpu, cuda, strict")


def test_plan_200b():
    r4 = spark_lab("plan", "200B", "--params", "200e9", "--bits", "4", "--context", "4096", "--json",
                   extra_env={"SPARK_LAB_DEVICE": "cpu"})
    assert r4.returncode == 0, r4.stderr
    p4 = json.loads(r4.stdout)
    assert p4["weights"] == 100 * 10**9 and p4["fits_spark"] is True and p4["context"] == 4096
    r8 = spark_lab("plan", "200B", "--params", "200e9", "--bits", "8", extra_env={"SPARK_LAB_DEVICE": "cpu"})
    assert r8.returncode == 0, r8.stderr
    assert "weights" in r8.stdout and "(200.0 GB)" in r8.stdout and "fits Spark   no" in r8.stdout
