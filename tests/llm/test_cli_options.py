"""`spark-lab generate` and `spark-lab chat` refuse bad sampling options up front: one line naming the
flag, before a model loads or a message is read (stdin closed, so a late check would show as a banner
or an EOF exit 0 instead)."""
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "spark_lab.cli"]


def _run(*args):
    env = dict(os.environ, SPARK_LAB_THREADS="1")
    return subprocess.run(CLI + list(args), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env, timeout=120)


BAD = [
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--min-p", "1.5"], "--min-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--seed", "-7"], "--seed"),
]


@pytest.mark.parametrize("command", ["chat", "generate"])
@pytest.mark.parametrize("flags,named", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_option_fails_before_anything_starts(command, flags, named):
    # a model name that does not exist: were the options checked after loading, the error would be "no model"
    args = [command, "--model", "no-such-model", *flags] + (["hi"] if command == "generate" else [])
    r = _run(*args)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert named in lines[0] and "no model" not in lines[0], lines[0]
    assert lines[0].startswith(f"spark-lab {command}: error:")
    assert r.stdout == ""                                   # no banner, no "bot> "


def test_good_options_reach_the_model_lookup():
    """The same command with sane flags gets past the checks (and stops at the missing model)."""
    r = _run("chat", "--model", "no-such-model", "--max-new-tokens", "5", "--temperature", "0.5",
             "--top-p", "0.8", "--seed", "-1")
    assert r.returncode != 0 and "no model" in r.stderr, r.stderr
