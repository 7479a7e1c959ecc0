"""`spark-lab imagine` end to end on the tiny fixture model (in process)."""
from pathlib import Path

import pytest
from PIL import Image

from spark_lab import cli

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"


def run(*argv):
    return cli.main(["imagine", *map(str, argv)])


def test_imagine_writes_upscaled_grid_and_is_seeded(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert run("a cat", "--model", FIX / "tiny-sd", "--steps", 2, "--seed", 3, "--num-images", 2, "--out", a) == 0
    assert run("a cat", "--model", FIX / "tiny-sd", "--steps", 2, "--seed", 3, "--num-images", 2, "--out", b) == 0
    ia = Image.open(a)
    assert ia.size == (2 * 256, 256)                       # two 16x16 images, x16 nearest, side by side
    assert ia.tobytes() == Image.open(b).tobytes()
    assert "2 image(s) 16x16" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (("--steps", 0), "--steps must be a positive integer"),
    (("--scheduler", "plms"), "unknown scheduler"),
    (("--out", "x.jpg"), "must be a .png"),
])
def test_imagine_errors_are_one_line(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        rc = run("a cat", "--model", FIX / "tiny-sd", *argv)
        raise SystemExit(rc)
    assert e.value.code != 0
    assert msg in capsys.readouterr().err


def test_imagine_never_creates_folders_it_was_not_asked_for(tmp_path, capsys):
    missing = tmp_path / "no_such_dir" / "x.png"
    assert run("a cat", "--model", FIX / "tiny-sd", "--steps", 1, "--out", missing) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "--mkdir" in err and len(err.strip().splitlines()) == 1
    assert not missing.parent.exists()
    assert run("a cat", "--model", FIX / "tiny-sd", "--steps", 1, "--out", missing, "--mkdir") == 0
    assert Image.open(missing).size == (256, 256)
    assert "1 image(s) 16x16 (upscaled to a 256x256 file)" in capsys.readouterr().out
