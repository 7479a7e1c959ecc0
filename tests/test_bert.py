"""BERT / MiniLM sentence embeddings on spark_lab kernels vs transformers (the reference)."""
import numpy as np
import pytest

from spark_lab.device import to_host
from spark_lab.models import ModelNotFound, resolve
from spark_lab.text import BertModel, SentenceEncoder
from spark_lab.text.bert import BertConfig

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The new movie is awesome!",
    "hello",
    "",
    "Unified memory lets the GPU and CPU share one 128 GB pool.",
    "The price rose 3.5% to $1,024.75 on 2024-03-01.",
    "Ceci n'est pas une pipe, dit le peintre.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "भारत एक विशाल देश है। यहाँ कई भाषाएँ बोली जाती हैं।",
    "東京は日本の首都です。",
    "Emoji test 🚀🔥 and accents: café, naïve, São Paulo.",
    "def f(x): return x ** 2  # code is text too",
    "   leading and trailing spaces   ",
    "UPPERCASE SENTENCES ARE LOWERCASED BY THE TOKENIZER.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Why did the chicken cross the road? To get to the other side.",
    # longer than 256 word pieces: truncated the same way as sentence-transformers
    "Long input about rivers and mountains and the weather in the valley. " * 30,
    "a " * 400,
]


@pytest.fixture(scope="module")
def model_path():
    try:
        return resolve("all-minilm-l6-v2", kind="embedding")
    except ModelNotFound as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def encoder(model_path):
    return SentenceEncoder.load("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def hf(model_path):
    """transformers' tokenizer and BertModel on the same folder: the reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return (torch, transformers.AutoTokenizer.from_pretrained(str(model_path)),
            transformers.BertModel.from_pretrained(str(model_path)).eval())


def _reference(hf, sentences, max_length=256):
    torch, tok, model = hf
    b = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = model(**b).last_hidden_state
    m = b["attention_mask"][..., None].float()
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)           # mean pooling, as sentence-transformers
    return torch.nn.functional.normalize(e, dim=-1).numpy(), b["input_ids"].shape[1]


def test_matches_transformers_mean_pooling(encoder, hf):
    ref, T = _reference(hf, SENTENCES)
    assert T == 256                                          # the long inputs were truncated
    e = encoder.encode(SENTENCES, batch_size=8)
    assert e.dtype == np.float32 and e.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e, ref, atol=1e-5, rtol=0)


def test_hidden_states_match_transformers(encoder, hf):
    torch, _, ref = hf
    ids, mask = encoder.tokenize(SENTENCES[:6])
    h = to_host(encoder.model(ids, mask))
    with torch.no_grad():
        r = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    keep = mask.astype(bool)
    assert h.dtype == np.float32
    np.testing.assert_allclose(h[keep], r[keep], atol=2e-5, rtol=0)   # padded rows are don't-care


def test_batching_and_padding_do_not_change_embeddings(encoder):
    a = encoder.encode(SENTENCES[:10], batch_size=1)
    b = encoder.encode(SENTENCES[:10], batch_size=32)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    one = encoder.encode(SENTENCES[0])
    assert one.shape == (384,)
    np.testing.assert_allclose(one, a[0], atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)
    raw = encoder.encode(SENTENCES[:3], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_similar_sentences_score_higher(encoder):
    # the sentence-transformers README semantics, pinned
    e = encoder.encode(["A man is eating food.", "A man is eating a piece of bread.",
                        "A man is riding a horse.", "A monkey is playing drums.",
                        "Someone in a gorilla costume is playing a set of drums."])
    s = e @ e.T
    assert s[0, 1] > s[0, 2] and s[0, 1] > s[0, 3] and s[0, 1] > 0.6
    assert s[3, 4] > s[3, 0] and s[3, 4] > s[3, 2] and s[3, 4] > 0.5
    q = encoder.encode(["How do I bake bread at home?"])[0]
    docs = encoder.encode(["A simple recipe for homemade sourdough loaves.",
                           "The quarterly earnings report of a car maker.",
                           "Rules of chess for beginners."])
    assert int(np.argmax(docs @ q)) == 0


def test_weights_are_placed_through_the_allocator(encoder):
    from spark_lab.memory import get_allocator
    st = get_allocator().stats()
    assert st.by_tag["weights"] >= encoder.model.nbytes > 80_000_000
    assert encoder.max_seq_length == 256 and encoder.pooling == "mean" and encoder.normalize


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_tiny_random_bert_matches_transformers(tmp_path, act):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
                                  hidden_act=act, layer_norm_eps=1e-12)
    ref = transformers.BertModel(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = BertModel.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    tt = rng.integers(0, 2, size=ids.shape)
    with torch.no_grad():
        r = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.from_numpy(tt)).last_hidden_state.numpy()
    h = to_host(ours(ids, mask, tt))
    keep = mask.astype(bool)
    np.testing.assert_allclose(h[keep], r[keep], atol=1e-5, rtol=0)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertModel.from_pretrained(tmp_path)
    with pytest.raises(ModelNotFound):
        SentenceEncoder.load(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=10, num_attention_heads=3)


def test_bad_inputs(encoder):
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode([1, 2])
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        encoder.model(np.array([1, 2, 3]))


@pytest.mark.gpu
def test_encoder_on_gpu_matches_transformers(hf, gpu_device):
    from spark_lab.device import array_module
    enc = SentenceEncoder.load("all-minilm-l6-v2")
    assert array_module(enc.model.w["embeddings.word_embeddings.weight"]).__name__ == "cupy"
    ref, _ = _reference(hf, SENTENCES)
    e = enc.encode(SENTENCES, batch_size=8)
    assert isinstance(e, np.ndarray) and e.dtype == np.float32
    np.testing.assert_allclose(e, ref, atol=1e-4, rtol=0)  # cuBLAS sums in another order than MKL/OpenBLAS
