"""What a cold `spark-lab generate` skips or overlaps, with the results unchanged: long GGUF string
arrays read on first use, gguf-py's constants without the rest of gguf-py."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from spark_lab import ggml_types
from spark_lab.gguf import LAZY_STRINGS, GGUFFile, StringArray


@pytest.fixture(scope="module")
def strings_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("strings") / "s.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_array("t.long", [f"tok{i}".encode() if i % 7 else b"\xff\xfe" for i in range(LAZY_STRINGS + 500)])
    w.add_array("t.short", [b"a", b"", b"bc"])
    w.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(path, key):
    r = GGUFReader(str(path))
    f = r.fields[key]
    return [bytes(f.parts[i]) for i in f.data]


def test_long_string_arrays_are_read_on_first_use_and_equal_gguf_py(strings_gguf):
    f = GGUFFile(strings_gguf)
    long, short = f.metadata["t.long"], f.metadata["t.short"]
    assert isinstance(long, StringArray) and long._items is None        # not read by the parse
    assert len(long) == LAZY_STRINGS + 500 and long._items is None      # its length is known unread
    assert short._items is not None and short == [b"a", b"", b"bc"]    # short ones are read at once
    ref = _reference(strings_gguf, "t.long")
    assert long[7] == b"\xff\xfe" and long[8] == b"tok8"
    assert long == ref and list(long) == ref and long[-3:] == ref[-3:]
    assert pickle.loads(pickle.dumps(GGUFFile(strings_gguf).metadata["t.long"])) == ref


def test_truncated_string_array_is_still_one_error(strings_gguf, tmp_path):
    data = strings_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:data.find(b"tok1000")])
    from spark_lab.gguf import GGUFError
    with pytest.raises(GGUFError, match="truncated GGUF .*t.long"):
        GGUFFile(cut)


def test_ggml_types_are_gguf_py_constants():
    for ours, theirs in zip(ggml_types.GGMLQuantizationType, gguf.GGMLQuantizationType, strict=True):
        assert ours.name == theirs.name and ours == theirs and hash(ours) == hash(theirs)
    assert dict(ggml_types.GGML_QUANT_SIZES) == dict(gguf.GGML_QUANT_SIZES)
    assert [v.name for v in ggml_types.GGUFValueType] == [v.name for v in gguf.GGUFValueType]
    q = ggml_types.GGMLQuantizationType.Q4_K
    assert pickle.loads(pickle.dumps(q)) == q


def test_the_llm_path_does_not_import_gguf_py():
    code = ("import sys, json; from spark_lab.llm import LLM; from spark_lab.llm.cli import cmd_generate; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'gguf' or m.startswith('gguf.'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
