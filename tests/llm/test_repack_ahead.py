"""Transformer's repack-ahead thread (a small GGUF on the CPU with numba): the layers are repacked
on a helper thread while the process loads the rest; the forward pass takes turns with it."""
import gguf
import numpy as np
import pytest

from spark_lab.llm import LLM
from spark_lab.llm import model as M
from spark_lab.numba_threads import concurrent_launches

from .tiny import write_tiny_gguf

pytest.importorskip("numba")
Q = gguf.GGMLQuantizationType


def _logits(path, monkeypatch, ahead: str):
    monkeypatch.setenv("SPARK_LAB_REPACK_AHEAD", ahead)
    llm = LLM(path, n_ctx=64)
    started = bool(M._AHEAD)
    out = llm.model.forward(np.arange(40, 60), 0, llm.cache)
    M.join_ready_ahead()
    assert not llm.model._unready
    return started, out


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_repack_ahead_gives_the_numbers_of_repacking_in_turn(tmp_path, monkeypatch, qtype):
    if not concurrent_launches():
        pytest.skip("numba's threading layer takes launches from one thread at a time here")
    p = write_tiny_gguf(tmp_path / "m.gguf", d=256, ff=512, n_layer=3, qtype=qtype, quant_embd=True)
    on, ahead = _logits(p, monkeypatch, "1")
    off, in_turn = _logits(p, monkeypatch, "0")
    assert on and not off
    np.testing.assert_array_equal(ahead, in_turn)


def test_an_error_on_the_repack_thread_reaches_the_forward_pass(tmp_path, monkeypatch):
    if not concurrent_launches():
        pytest.skip("numba's threading layer takes launches from one thread at a time here")
    p = write_tiny_gguf(tmp_path / "m.gguf", d=64, ff=128, qtype=Q.Q4_1)

    def fail(self, L, i):
        raise MemoryError(f"blk.{i}: over the memory budget")
    monkeypatch.setattr(M.Transformer, "_repack_layer", fail)
    monkeypatch.setenv("SPARK_LAB_REPACK_AHEAD", "1")
    llm = LLM(p, n_ctx=32)
    M.join_ready_ahead()                                      # it met the error and stopped
    assert 0 in llm.model._unready
    with pytest.raises(MemoryError, match="blk.0: over the memory budget"):
        llm.model.forward(np.arange(40, 50), 0, llm.cache)
