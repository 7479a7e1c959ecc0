"""`spark-lab bench imagine` runs both sides and reports a ratio (tiny fixture model; no timing asserts)."""
import json
from argparse import Namespace
from pathlib import Path

import pytest

from spark_lab.benchmarks import imagine

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"


def test_bench_imagine_json(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    args = Namespace(json=True, threads=1, model=str(FIX / "tiny-pixel"), repeats=1, quick=True)
    assert imagine.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["spark_lab_s_per_image"] > 0 and row["diffusers_s_per_image"] > 0
    assert row["ratio"] == pytest.approx(row["diffusers_s_per_image"] / row["spark_lab_s_per_image"], rel=0.01)
    assert row["spark_lab_cpu_s_per_image"] > 0 and row["diffusers_cpu_s_per_image"] > 0
    assert row["cpu_ratio"] == pytest.approx(row["diffusers_cpu_s_per_image"] / row["spark_lab_cpu_s_per_image"], rel=0.01)
    assert row["max_abs_diff"] < 1e-3          # the same image from both
