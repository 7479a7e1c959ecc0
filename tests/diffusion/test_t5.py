"""The T5 text encoder (Flux / SD3) and its tokenizer vs transformers on tiny random models.

reference.npz was written by tools/make_t5_fixtures.py with transformers' T5TokenizerFast and
T5EncoderModel (float32); spark_lab must give the same ids and hidden states within 1e-4.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spark_lab.device import to_host
from spark_lab.text.t5 import T5EncoderModel, T5Tokenizer, relative_position_bucket

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion" / "tiny-t5"
REF = np.load(FIX / "reference.npz")
# the prompts make_t5_fixtures.py tokenized: spaces, tabs, unknown characters, sentinels, special
# tokens typed in the text, and characters the tokenizer's SentencePiece charsmap normalises
PROMPTS = ["a photo of a cat", "  Happy  DOG,\tsmiling face!\n", "", "a red sunset over the mountains, city xyz",
           "<extra_id_0> cat<extra_id_2>", "\ufb01re\u3000on the \uff21\uff24 hill", "a cat </s> dog <pad>"]


def close(a, b):
    a = to_host(a)
    assert a.dtype == np.float32, a.dtype
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def tok():
    return T5Tokenizer.from_pretrained(FIX / "tokenizer_3")


@pytest.fixture(scope="module")
def gated():
    return T5EncoderModel.from_pretrained(FIX / "text_encoder_3")


def test_tokenizer_matches_transformers(tok):
    ids, mask = tok(PROMPTS, max_length=24, return_attention_mask=True)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (7, 24)
    np.testing.assert_array_equal(ids, REF["ids"])
    np.testing.assert_array_equal(mask, REF["mask"])
    np.testing.assert_array_equal(tok(PROMPTS, max_length=24), REF["ids"])
    # truncated to max_length with </s> (id 1) kept last; pad id 0
    long_ids, long_mask = tok(["a red dog " * 10, "a cat"], max_length=8, return_attention_mask=True)
    np.testing.assert_array_equal(long_ids, REF["long_ids"])
    np.testing.assert_array_equal(long_mask, REF["long_mask"])
    assert long_ids[0, -1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok("a cat").shape == (1, 512)                                 # model_max_length from tokenizer_config
    assert tok.decode(REF["ids"][0]) == "a photo of a cat"


def test_gated_gelu_encoder_matches_transformers(gated, tok):
    assert gated.config.gated and gated.config.act == "gelu_new"
    close(gated(REF["ids"]).last_hidden_state, REF["gated_hidden"])
    close(gated(REF["ids"], attention_mask=REF["mask"])[0], REF["gated_hidden_masked"])
    # the tokenizer's output feeds the encoder directly
    ids, mask = tok(PROMPTS, max_length=24, return_attention_mask=True)
    close(gated(ids, mask).last_hidden_state, REF["gated_hidden_masked"])


def test_relu_encoder_matches_transformers():
    m = T5EncoderModel.from_pretrained(FIX / "text_encoder_relu")
    assert not m.config.gated and m.config.act == "relu" and m.config.layer_norm_epsilon == 1e-5
    close(m(REF["ids"]).last_hidden_state, REF["relu_hidden"])
    close(m(REF["ids"], attention_mask=REF["mask"]).last_hidden_state, REF["relu_hidden_masked"])


def test_mask_changes_the_padded_rows_only_through_attention(gated):
    """Padding keys are ignored: a prompt's real tokens get the same states at any padded length."""
    ids, mask = REF["ids"][:1], REF["mask"][:1]                          # 6 real tokens, 18 pads
    n = int(mask.sum())
    short = to_host(gated(ids[:, :n]).last_hidden_state)
    padded = to_host(gated(ids, attention_mask=mask).last_hidden_state)[:, :n]
    np.testing.assert_allclose(padded, short, rtol=1e-5, atol=1e-5)
    unmasked = to_host(gated(ids).last_hidden_state)[:, :n]
    assert np.abs(unmasked - short).max() > 1e-2                         # without the mask the pads count


def test_relative_position_buckets_by_hand():
    # 16 buckets, max distance 12: 8 per direction, distances 0..3 exact, 4..11 logarithmic, >= 12 -> 7
    rel = np.array([0, -1, -3, -4, -5, -7, -11, -12, -100, 1, 3, 4, 12, 1000])
    # 4 + floor(log(d / 4) / log(3) * 4), capped at 7: d=5 -> 4.81 -> 4, d=7 -> 6.04 -> 6, d=11 -> 7.68 -> 7;
    # keys after the query add 8
    want = np.array([0, 1, 3, 4, 4, 6, 7, 7, 7, 9, 11, 12, 15, 15])
    np.testing.assert_array_equal(relative_position_bucket(rel, 16, 12), want)


def test_live_against_transformers_bf16_shards_and_fp16_variant(tmp_path, gated):
    """transformers run in the test: random ids and a left-padded mask, bucket tables at T5-XXL's
    settings, a bf16 checkpoint split in shards and an fp16 variant (both upcast to float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import save_file

    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-3000, 3001)
    for nb, md in [(32, 128), (16, 12), (64, 256)]:
        want = T5Attention._relative_position_bucket(torch.from_numpy(rel), True, nb, md).numpy()
        np.testing.assert_array_equal(relative_position_bucket(rel, nb, md), want)

    ref = transformers.T5EncoderModel.from_pretrained(FIX / "text_encoder_3").eval()
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 100, size=(3, 40))
    mask = np.ones((3, 40), dtype=np.int64)
    mask[1, :7] = 0                                                      # left padding
    mask[2, 25:] = 0
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    close(gated(ids, mask).last_hidden_state, want)

    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="30KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    bf = T5EncoderModel.from_pretrained(tmp_path / "bf16")
    assert all(a.dtype == np.float32 for a in bf.w.values())
    ref = ref.float()                                                    # bf16-rounded weights, float32 math
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    close(bf(ids).last_hidden_state, want)

    fp16 = tmp_path / "fp16"
    fp16.mkdir()
    shutil.copy(FIX / "text_encoder_3" / "config.json", fp16 / "config.json")
    save_file({k: v.numpy().astype(np.float16) for k, v in ref.state_dict().items()
               if k != "encoder.embed_tokens.weight"}, str(fp16 / "model.fp16.safetensors"))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    close(T5EncoderModel.from_pretrained(fp16, variant="fp16")(ids).last_hidden_state, want)


def _copy(tmp_path, name="text_encoder_3", **changes):
    d = tmp_path / name
    shutil.copytree(FIX / name, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_bad_folders_and_configs(tmp_path, gated):
    with pytest.raises(FileNotFoundError) as e:
        T5EncoderModel.from_pretrained(tmp_path / "nope")
    assert "missing text encoder folder" in one_line(e)
    with pytest.raises(ValueError) as e:                                 # an encoder-decoder that is not T5
        T5EncoderModel.from_pretrained(_copy(tmp_path, model_type="bart", is_encoder_decoder=True))
    assert "model_type 'bart' is not 't5'" in one_line(e)
    with pytest.raises(ValueError) as e:                                 # a v1.0 config over v1.1 weights
        T5EncoderModel.from_pretrained(_copy(tmp_path / "a", feed_forward_proj="relu"))
    assert "no weight 'encoder.block.0.layer.1.DenseReluDense.wi.weight'" in one_line(e)
    with pytest.raises(ValueError) as e:
        T5EncoderModel.from_pretrained(_copy(tmp_path / "b", feed_forward_proj="gated-tanh-gelu"))
    assert "feed_forward_proj 'gated-tanh-gelu' is not supported" in one_line(e)
    with pytest.raises(ValueError) as e:
        T5EncoderModel.from_pretrained(_copy(tmp_path / "c", d_kv=4))
    assert "SelfAttention.q.weight' is (32, 32), config.json says (16, 32)" in one_line(e)
    with pytest.raises(ValueError) as e:
        T5EncoderModel.from_pretrained(_copy(tmp_path / "d", is_decoder=True))
    assert "is_decoder" in one_line(e)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(FileNotFoundError) as e:
        T5EncoderModel.from_pretrained(empty)
    assert "no weights in" in one_line(e)
    with pytest.raises(ValueError) as e:
        gated(REF["ids"], attention_mask=REF["mask"][:, :5])
    assert "attention_mask (7, 5) does not match input_ids (7, 24)" in one_line(e)
    with pytest.raises(ValueError) as e:
        gated(REF["ids"][0])
    assert "should be integer [batch, length]" in one_line(e)
    with pytest.raises(ValueError) as e:
        gated(np.array([[1, 100]]))
    assert "out of range" in one_line(e)


def test_bad_tokenizer_folders(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        T5Tokenizer.from_pretrained(tmp_path)
    assert "no tokenizer.json" in one_line(e)
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    Tokenizer(BPE({"a": 0, "</s>": 1, "<pad>": 2}, [])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError) as e:
        T5Tokenizer.from_pretrained(tmp_path)
    assert "Unigram (SentencePiece) model, this one is 'BPE'" in one_line(e)
    with pytest.raises(ValueError) as e:
        T5Tokenizer.from_pretrained(FIX / "tokenizer_3")(["a"], max_length=0)
    assert "max_length must be >= 1" in one_line(e)
