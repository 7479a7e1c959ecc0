"""How many cases each fuzz target runs: a few seconds' worth in `make test` (HYPOTHESIS_PROFILE=ci,
the default, derandomized so CI is repeatable), 50x that with `make fuzz` (HYPOTHESIS_PROFILE=fuzz,
random seeds, a new corner each run). A case that takes over 5 s fails as a hang (20 s under ci).

Every case a budgeted test runs is counted under its target (the issue's list: GGUF reader, safetensors
and diffusers loading, tokenizer, chat template, summarize readers, server bodies); tests/fuzz/conftest.py
prints the counts and seconds at the end of the run and writes them to SPARK_LAB_FUZZ_REPORT if set."""
from __future__ import annotations

import os
import time
from datetime import timedelta

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ_SCALE = int(os.environ.get("SPARK_LAB_FUZZ_SCALE", "50"))
CI_FLOOR = 2_000            # cases per target in make test (the acceptance); make fuzz: FUZZ_SCALE times that
_quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.function_scoped_fixture]
# ci allows 20 s a case: the suite shares 2 loaded cores with other tests, and a real hang never ends anyway
settings.register_profile("ci", derandomize=True, database=None, deadline=timedelta(seconds=20),
                          suppress_health_check=_quiet, print_blob=True)
settings.register_profile("fuzz", database=None, deadline=timedelta(seconds=5), suppress_health_check=_quiet,
                          print_blob=True)
settings.load_profile(PROFILE if PROFILE in ("ci", "fuzz") else "ci")

# test module -> target of the list
TARGETS = {"test_gguf_fuzz": "gguf reader", "test_load_fuzz": "gguf reader",
           "test_loaders_fuzz": "safetensors/diffusers loading", "test_tokenizer_fuzz": "tokenizer",
           "test_template_fuzz": "chat template", "test_readers_fuzz": "summarize readers",
           "test_serve_fuzz": "server bodies"}
CASES: dict[str, list] = {}   # target -> [cases run, seconds inside the cases]


def target_of(module: str) -> str:
    return TARGETS.get(module.rsplit(".", 1)[-1], module)


def budget(ci_examples: int):
    """Decorator for a @given test: `ci_examples` cases in make test, FUZZ_SCALE times more in make fuzz;
    each case run is counted under the test's target."""
    n = ci_examples if PROFILE != "fuzz" else ci_examples * FUZZ_SCALE

    def wrap(test):
        inner = test.hypothesis.inner_test
        tally = CASES.setdefault(target_of(test.__module__), [0, 0.0])

        def counted(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                tally[0] += 1
                tally[1] += time.perf_counter() - t0

        test.hypothesis.inner_test = counted
        return settings(max_examples=n)(test)
    return wrap


_CASE_DIR: list = []


def case_dir(tmp_path_factory):
    """Where a case writes its file: a memory-backed folder (/dev/shm) when the machine has one, since the
    disk's open-and-truncate was most of a parse case's time; the parser still reads a real file by path."""
    if not _CASE_DIR:
        import atexit
        import shutil
        import tempfile
        try:
            d = tempfile.mkdtemp(prefix="spark-lab-fuzz-", dir="/dev/shm")
            atexit.register(shutil.rmtree, d, True)
        except OSError:
            d = str(tmp_path_factory.getbasetemp())
        from pathlib import Path
        _CASE_DIR.append(Path(d))
    return _CASE_DIR[0]
