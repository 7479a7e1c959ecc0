"""warmup: the stamp says which parts were compiled for these sources; numba's cache stays out of git."""
import json
import subprocess
from pathlib import Path

import pytest

from spark_lab import warmup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_in(tmp_path, monkeypatch):
    from numba.core import config
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))
    return tmp_path


def test_stamp_records_the_parts_that_ran_and_the_sources(cache_in, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(warmup.WARMERS, "text", lambda: calls.append("text") or "ok")
    monkeypatch.setitem(warmup.WARMERS, "llm", lambda: 1 / 0)          # a failing part is reported, not stamped
    assert warmup.stamp_path() == cache_in / warmup.STAMP_NAME
    assert not warmup.is_warm(["text"])
    assert "compiling kernels (first run only)" in warmup.compile_note("text")
    seconds = warmup.warmup(["text", "llm"])
    assert calls == ["text"] and set(seconds) == {"text", "llm"}
    out = capsys.readouterr().out
    assert "llm… " in out and "FAILED (ZeroDivisionError" in out
    stamp = json.loads((cache_in / warmup.STAMP_NAME).read_text())
    assert stamp["parts"] == ["text"] and stamp["fingerprint"] == warmup.fingerprint()
    assert warmup.is_warm(["text"]) and not warmup.is_warm(["text", "llm"])
    assert "compiled ahead" in warmup.compile_note("text")
    # an edited source (another stat) makes the stamp stale
    monkeypatch.setattr(warmup, "fingerprint", lambda: "other sources")
    assert not warmup.is_warm(["text"])
    with pytest.raises(ValueError, match="part must be one of"):
        warmup.compile_note("nope")


def test_main_names_a_bad_part_and_check_exits_1_when_cold(cache_in, capsys):
    assert warmup.main(["nope"]) == 2
    assert "no part named 'nope'" in capsys.readouterr().err
    assert warmup.main(["--check", "images"]) == 1
    assert "cold" in capsys.readouterr().out


def test_numba_cache_files_are_ignored_by_git():
    """numba writes <module>.<kernel>-<line>.py311.nbi/.nbc into __pycache__ beside each source."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "*.nbi", "*.nbc", "**/__pycache__/**"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked == []
    probe = ["spark_lab/kernels/__pycache__/norms._rms-12.py311.nbi", "spark_lab/__pycache__/" + warmup.STAMP_NAME,
             "spark_lab/llm/__pycache__/decode._rope_rows-41.py311.1.nbc"]
    ignored = subprocess.run(["git", "check-ignore", *probe], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert ignored == probe
