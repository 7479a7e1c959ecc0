"""safetensors files, diffusers config files and BERT folders from strangers: a ValueError line (or a
FileNotFoundError) for every corrupt one, checked before anything big is allocated."""
from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st
from safetensors.numpy import save_file

from spark_lab.diffusion.loading import load_model_folder, read_json, read_safetensors
from spark_lab.text.bert import BertConfig, BertModel

from .budget import budget, case_dir

TENSORS = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16),
           "c": np.array([1, 2], np.int64)}
VAE = Path(__file__).parent.parent / "fixtures" / "diffusion" / "tiny-sd" / "vae"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    p = tmp_path_factory.mktemp("st") / "v.safetensors"
    save_file(TENSORS, str(p))
    return p.read_bytes()


def _read(path: Path, data: bytes):
    path.write_bytes(data)
    t0 = time.process_time()   # CPU seconds, not wall: robust to a loaded machine
    try:
        out = read_safetensors(path)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        assert time.process_time() - t0 < 1.0
        return str(e)
    for a in out.values():
        np.asarray(a).sum()          # every accepted view is readable
    return out


def test_valid_matches_safetensors(valid, tmp_path):
    out = _read(tmp_path / "f.safetensors", valid)
    for k, a in TENSORS.items():
        np.testing.assert_array_equal(out[k], a)


def test_every_truncation(valid, tmp_path):
    for n in range(len(valid)):
        assert isinstance(_read(tmp_path / "f.safetensors", valid[:n]), str), f"{n}-byte prefix accepted"


@budget(1000)
@given(st.data())
def test_bit_flips_and_forged_sizes(valid, tmp_path_factory, data):
    b = bytearray(valid)
    if data.draw(st.booleans()):
        b[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 2**31, 2**40, 2**63, 2**64 - 1])))
    for pos, bit in data.draw(st.lists(st.tuples(st.integers(0, len(b) - 1), st.integers(0, 7)), max_size=6)):
        b[pos] ^= 1 << bit
    _read(case_dir(tmp_path_factory) / "f.safetensors", bytes(b))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                           max_leaves=12)


@budget(400)
@given(st.dictionaries(st.text(max_size=6), st.fixed_dictionaries(
    {}, optional={"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "X9"]) | json_values,
                  "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
                  "data_offsets": st.lists(st.integers(-8, 2**62), max_size=3) | json_values}) | json_values,
    max_size=3), st.integers(0, 64))
def test_random_headers(tmp_path_factory, header, n_data):
    raw = json.dumps(header).encode()
    _read(case_dir(tmp_path_factory) / "f.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(n_data))


@budget(300)
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_config_json(tmp_path_factory, raw):
    p = case_dir(tmp_path_factory) / "config.json"
    p.write_bytes(raw)
    try:
        assert isinstance(read_json(p), dict)
    except ValueError as e:
        assert "\n" not in str(e)[:200]
    try:
        BertConfig.from_json(p)
    except ValueError:
        pass


@budget(300)
@given(st.dictionaries(st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "intermediate_size", "layer_norm_eps", "hidden_act", "model_type"]),
                       json_values, max_size=4))
def test_bert_config_values(tmp_path_factory, raw):
    p = case_dir(tmp_path_factory) / "bert.json"
    p.write_text(json.dumps(raw))
    try:
        c = BertConfig.from_json(p)
    except ValueError as e:
        assert str(e)
        return
    assert c.hidden_size % c.num_attention_heads == 0 and c.head_dim > 0


def _bert_folder(path: Path, d=8, heads=2, ff=16, layers=1, vocab=10, bad: str | None = None):
    cfg = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=ff, max_position_embeddings=16, type_vocab_size=2)
    w = {f"embeddings.{k}": np.zeros(s, np.float32) for k, s in [("word_embeddings.weight", (vocab, d)),
         ("position_embeddings.weight", (16, d)), ("token_type_embeddings.weight", (2, d)),
         ("LayerNorm.weight", (d,)), ("LayerNorm.bias", (d,))]}
    for k, s in BertModel._shapes(BertConfig(**cfg)).items():
        w[k] = np.zeros(s, np.float32)
    if bad:
        w[bad] = np.zeros((3, 3), np.float32)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "model.safetensors"))
    return path


def test_bert_wrong_shape_is_one_line(tmp_path):
    folder = _bert_folder(tmp_path / "b", bad="encoder.layer.0.intermediate.dense.weight")
    with pytest.raises(ValueError, match=r"intermediate.dense.weight has shape \(3, 3\), config.json says \(16, 8\)"):
        BertModel.from_pretrained(folder)


def test_bert_truncated_weights_is_one_line(tmp_path):
    folder = _bert_folder(tmp_path / "b")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        BertModel.from_pretrained(folder)


def test_bert_folder_loads(tmp_path):
    m = BertModel.from_pretrained(_bert_folder(tmp_path / "b"))
    assert m.config.head_dim == 4


@pytest.mark.parametrize("config, match", [("[1, 2]", "JSON list"), ("{", "not valid JSON"), ("\udcff", None)])
def test_model_folder_bad_config(tmp_path, config, match):
    folder = tmp_path / "vae"
    shutil.copytree(VAE, folder)
    if match is None:
        (folder / "config.json").write_bytes(b"\xff\xfe{")
        match = "not valid JSON"
    else:
        (folder / "config.json").write_text(config)
    with pytest.raises(ValueError, match=match):
        load_model_folder(folder)


def test_model_folder_truncated_weights(tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(VAE, folder)
    w = folder / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model_folder(folder)
