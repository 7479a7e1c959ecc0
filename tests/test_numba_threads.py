"""numba's TBB threading layer is the one a spark_lab process gets where the tbb package is installed
(spark_lab/numba_threads.py), and NUMBA_THREADING_LAYER still overrides it."""
import importlib.util
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

CODE = ("import spark_lab, numba, numpy as np\n"
        "@numba.njit(parallel=True)\n"
        "def f(a):\n"
        "    s = 0.0\n"
        "    for i in numba.prange(a.size):\n"
        "        s += a[i]\n"
        "    return s\n"
        "assert f(np.ones(100)) == 100.0\n"
        "print(numba.threading_layer())\n")


def _layer(**env) -> str:
    e = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", CODE], env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_tbb_where_installed():
    if importlib.util.find_spec("tbb") is None and not any(
            os.path.exists(os.path.join(sys.prefix, "lib", n)) for n in ("libtbb.so.12", "libtbb.12.dylib")):
        pytest.skip("the tbb package is not installed here")
    assert _layer() == "tbb"


def test_the_users_choice_wins():
    assert _layer(NUMBA_THREADING_LAYER="workqueue") == "workqueue"
