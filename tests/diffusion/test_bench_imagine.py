"""`spark-lab bench imagine` runs both sides and reports ratios: the emoji row on the tiny-pixel fixture,
the Flux and SDXL rows on their --quick stand-ins, each a same-output check against diffusers
(no timing asserts: times only have to exist and the ratios to be the quotients of them)."""
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from spark_lab.benchmarks import imagine

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"


@pytest.fixture(scope="module")
def rows():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import contextlib
    import io
    args = Namespace(json=True, threads=1, model=str(FIX / "tiny-pixel"), repeats=1, quick=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = imagine.main(args)
    lines = out.getvalue().strip().splitlines()
    return rc, {r["family"]: r for r in map(json.loads, lines)}


def test_bench_imagine_rows(rows):
    rc, by_family = rows
    assert rc == 0
    assert list(by_family) == ["emoji", "flux", "sdxl"]
    for row in by_family.values():
        assert row["threads"] == 1 and row["steps"] >= 1
        assert row["spark_lab_s_per_image"] > 0 and row["diffusers_s_per_image"] > 0
        assert row["ratio"] == pytest.approx(row["diffusers_s_per_image"] / row["spark_lab_s_per_image"], rel=0.01)
        assert row["spark_lab_cpu_s_per_image"] > 0 and row["diffusers_cpu_s_per_image"] > 0
        assert row["cpu_ratio"] == pytest.approx(row["diffusers_cpu_s_per_image"] / row["spark_lab_cpu_s_per_image"],
                                                 rel=0.01)
        assert row["agree"] is True


def test_bench_imagine_outputs_match_diffusers(rows):
    _, by_family = rows
    assert by_family["emoji"]["max_abs_diff"] < 1e-3                # the same image from both
    for fam in ("flux", "sdxl"):                                     # the same final latents, far tighter than
        r = by_family[fam]                                           # the command's own loose check
        assert r["max_abs"] > 0.1                                    # a real output, not zeros on both sides
        assert r["max_abs_diff"] < 1e-4 * (1.0 + r["max_abs"]), (fam, r["max_abs_diff"], r["max_abs"])


def test_bench_imagine_family_rows_describe_the_run(rows):
    _, by_family = rows
    assert by_family["flux"]["scheduler"] == "flow-match Euler" and by_family["sdxl"]["scheduler"] == "Euler"
    assert "Flux" in by_family["flux"]["model"] and "SDXL" in by_family["sdxl"]["model"]
    assert by_family["sdxl"]["image"] == "8x8 latents"


def test_race_flags_different_outputs():
    a, b = np.zeros((1, 4, 2, 2), np.float32), np.full((1, 4, 2, 2), 0.5, np.float32)
    r = imagine.race(lambda: a, lambda: b, repeats=2)
    assert r["agree"] is False and r["max_abs_diff"] == pytest.approx(0.5)
    r = imagine.race(lambda: a, lambda: a + 1e-6, repeats=1)
    assert r["agree"] is True and r["ratio"] > 0 and r["cpu_ratio"] > 0


def test_print_row_text(rows, capsys):
    _, by_family = rows
    imagine.print_row(by_family["sdxl"])
    text = capsys.readouterr().out
    assert "imagine sdxl" in text and "x wall" in text and "differ by at most" in text and "DISAGREE" not in text
