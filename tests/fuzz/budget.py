"""How many cases each fuzz target runs: a few seconds' worth in `make test` (HYPOTHESIS_PROFILE=ci,
the default, derandomized so CI is repeatable), 50x that with `make fuzz` (HYPOTHESIS_PROFILE=fuzz,
random seeds, a new corner each run). A case that takes over 5 s fails as a hang (20 s under ci)."""
from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ_SCALE = int(os.environ.get("SPARK_LAB_FUZZ_SCALE", "50"))
_quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.function_scoped_fixture]
# ci allows 20 s a case: the suite shares 2 loaded cores with other tests, and a real hang never ends anyway
settings.register_profile("ci", derandomize=True, database=None, deadline=timedelta(seconds=20),
                          suppress_health_check=_quiet, print_blob=True)
settings.register_profile("fuzz", database=None, deadline=timedelta(seconds=5), suppress_health_check=_quiet,
                          print_blob=True)
settings.load_profile(PROFILE if PROFILE in ("ci", "fuzz") else "ci")


def budget(ci_examples: int) -> settings:
    """settings for one target: `ci_examples` cases in make test, FUZZ_SCALE times more in make fuzz."""
    n = ci_examples if PROFILE != "fuzz" else ci_examples * FUZZ_SCALE
    return settings(max_examples=n)
