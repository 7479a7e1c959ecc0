"""Per-target fuzz figures: cases run (every example Hypothesis executed, shrinking included) and the
wall seconds of the target's tests, printed at the end of a run that collected tests/fuzz."""
from __future__ import annotations

import json
import os
from collections import defaultdict

from .budget import CASES, CI_FLOOR, FUZZ_SCALE, PROFILE, target_of

_SECONDS: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    if "tests/fuzz/" in report.nodeid.replace(os.sep, "/") and report.when in ("setup", "call", "teardown"):
        _SECONDS[target_of(report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py"))] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not any(n for n, _ in CASES.values()):
        return
    floor = CI_FLOOR * (FUZZ_SCALE if PROFILE == "fuzz" else 1)
    rows = {t: {"cases": n, "case_seconds": round(s, 2), "test_seconds": round(_SECONDS.get(t, 0.0), 2),
                "cases_per_s": round(n / s, 1) if s else None} for t, (n, s) in sorted(CASES.items())}
    terminalreporter.write_sep("-", f"fuzz targets ({PROFILE} profile, floor {floor} cases each)")
    for t, r in rows.items():
        mark = "" if r["cases"] >= floor else "  (below the floor: a partial run?)"
        terminalreporter.write_line(f"{t}: {r['cases']} cases, {r['test_seconds']} s "
                                    f"({r['cases_per_s']} cases/s inside the cases){mark}")
    if os.environ.get("SPARK_LAB_FUZZ_REPORT"):
        with open(os.environ["SPARK_LAB_FUZZ_REPORT"], "w") as f:
            json.dump({"profile": PROFILE, "floor": floor, "targets": rows}, f, indent=1)
