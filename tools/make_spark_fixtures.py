"""Regenerate tests/fixtures/spark/: tiny random transformers models converted to GGUF the way
real files are made (llama.cpp's own convert_hf_to_gguf.py), with transformers' logits.

    .venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcpp
    tar xzf /tmp/lcpp/llama_cpp_python-*.tar.gz -C /tmp/lcpp
    .venv/bin/python tools/make_spark_fixtures.py --llama-cpp /tmp/lcpp/llama_cpp_python-*/vendor/llama.cpp

Each model (<name>.gguf + <name>.npz with `tokens` [T] and transformers' `logits` [T, vocab]):
    qwen3moe     Qwen3MoeForCausalLM, 8 experts top-2 (renormalised)
    gpt-oss      GptOssForCausalLM: sinks, sliding/full layers (window 4), YaRN, biases, 4 experts top-2
    llama31      LlamaForCausalLM with rope_scaling llama3 (-> the rope_freqs.weight tensor)
    qwen3-yarn   Qwen3ForCausalLM with rope_scaling yarn
Weights are rounded to what the GGUF stores before transformers runs (float16 matrices; with
--experts Q8_0, Q8_0 round trips for the experts), so both sides multiply the same numbers.
F16 experts are the default: spark_lab's quantized products round activations to int8 blocks
(llama.cpp's semantics), which is ~1e-2 from float32 activations, so a 1e-3 comparison with
transformers needs float experts; the tests requantize the experts themselves for that path. The vocabulary is the
256 byte tokens plus a few merges and specials, which keeps each file at a few hundred KB.

--llamacpp-greedy (run with a Python that has llama-cpp-python, never the kit's venv) records
llama.cpp's own greedy run on each fixture instead: llamacpp_greedy.json holds, per model, the
prompt ids, 16 greedy tokens and the top-2 logits and their gap at every step, and the logits
after the prompt. Without an installed llama-cpp-python, its source's `llama_cpp/` folder and a
built libllama do (recorded that way, llama-cpp-python 0.3.36's own build):

    PYTHONPATH=/tmp/llpkg LLAMA_CPP_LIB_PATH=$BUILD/bin LD_LIBRARY_PATH=$BUILD/bin \
        .venv/bin/python tools/make_spark_fixtures.py --llamacpp-greedy

The converter runs in a subprocess with its vendored gguf-py. Two of its hooks are set there:
the BPE pre-tokenizer check (it hashes a test string's tokens against a list of known released
tokenizers, which a random byte-level one is not; "default" is the plain byte-level GPT-2
pre-tokenizer), the SentencePiece attempt for Llama (there is no tokenizer.model here, and
sentencepiece need not be installed) and, with --experts, tensor_force_quant (expert
tensors written in that type, as `llama-quantize` leaves them).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "spark"
N_TOKENS = 20

_RUNNER = r"""
import sys
lcpp, src, out = sys.argv[1:4]
sys.path.insert(0, lcpp + "/gguf-py")
sys.path.insert(0, lcpp)
import gguf
import convert_hf_to_gguf as conv
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
def no_sentencepiece(self):
    raise FileNotFoundError("no tokenizer.model")
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
expert_type = sys.argv[4]
if expert_type != "F16":
    _force = base.ModelBase.tensor_force_quant
    def force(self, name, new_name, bid, n_dims):
        if new_name.endswith("_exps.weight"):
            return gguf.GGMLQuantizationType[expert_type]
        return _force(self, name, new_name, bid, n_dims)
    base.ModelBase.tensor_force_quant = force
sys.argv = ["convert_hf_to_gguf.py", src, "--outfile", out, "--outtype", "f16"]
conv.main()
"""


MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]


def _tokenizer(folder: Path, specials: list[str]):
    """A byte-level BPE: the 256 byte tokens (GPT-2's printable alphabet), a few merges, specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    sys.path.insert(0, str(ROOT))
    from tests.llm.tiny import byte_vocab
    vocab = {ch: i for i, ch in enumerate(byte_vocab())}
    for x, y in MERGES:
        vocab[x + y] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1])
    fast.add_special_tokens({"additional_special_tokens": specials[2:]})
    fast.save_pretrained(folder)


def _q8_roundtrip(w):
    """torch [..., in] -> the same values after a Q8_0 quantize/dequantize along the last axis."""
    import gguf
    import torch
    a = w.detach().float().numpy()
    q = gguf.quants.quantize(a.reshape(-1, a.shape[-1]), gguf.GGMLQuantizationType.Q8_0)
    d = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape)
    return torch.from_numpy(np.ascontiguousarray(d))


EXPERTS = "F16"   # --experts


def _round(model, experts_in_last: dict[str, bool]):
    """Round the weights to what the GGUF keeps: matrices float16, experts Q8_0 (blocks run along
    each expert's input features: the last axis unless experts_in_last[name] is False)."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = next((k for k in experts_in_last if name.endswith(k)), None) if EXPERTS == "Q8_0" else None
            if key is not None:
                last = experts_in_last[key]
                t = p if last else p.transpose(-1, -2)
                r = _q8_roundtrip(t)
                p.copy_(r if last else r.transpose(-1, -2))
            elif p.ndim >= 2:
                p.copy_(p.half().float())


def _save(name: str, model, specials, lcpp: Path, tokens):
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hf"
        model.save_pretrained(src)
        _tokenizer(src, specials)
        out = OUT / f"{name}.gguf"
        subprocess.run([sys.executable, "-c", _RUNNER, str(lcpp), str(src), str(out), EXPERTS], check=True,
                       stdout=subprocess.DEVNULL)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float().numpy()
    np.savez_compressed(OUT / f"{name}.npz", tokens=np.asarray(tokens, np.int64), logits=logits.astype(np.float32))
    print(f"{name}: {out.stat().st_size / 1024:.0f} KB gguf, logits {logits.shape}")


def _randomize(model, std: float = 0.3):
    """Norm weights and sinks away from their init (1 / 0), so that reading them wrong shows;
    routers and biases large enough to matter; the output head at a real model's logit scale."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + std * torch.randn_like(p))
            elif name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
            elif name.endswith("bias") or "router" in name or name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name == "lm_head.weight":     # logits on a real model's scale (top-2 gaps of a logit or more)
                p.copy_(torch.randn_like(p))


def make_all(lcpp: Path):
    import torch
    import transformers as tf
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, 256, N_TOKENS)]
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1)

    torch.manual_seed(0)
    specials = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"]
    V = 256 + len(MERGES) + len(specials)
    cfg = tf.Qwen3MoeConfig(vocab_size=V, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, rms_norm_eps=1e-6,
                            rope_theta=1000000.0, **common)
    m = tf.Qwen3MoeForCausalLM(cfg).eval()
    _randomize(m)
    _round(m, {"experts.gate_up_proj": True, "experts.down_proj": True})
    _save("qwen3moe", m, specials, lcpp, tokens)

    torch.manual_seed(1)
    specials = ["<|startoftext|>", "<|return|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>"]
    V = 256 + len(MERGES) + len(specials)
    cfg = tf.GptOssConfig(vocab_size=V, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                          num_hidden_layers=4, sliding_window=4, rms_norm_eps=1e-5, rope_theta=150000.0,
                          rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "truncate": False, "original_max_position_embeddings": 128},
                          attn_implementation="eager", **common)
    m = tf.GptOssForCausalLM(cfg).eval()
    _randomize(m)
    # gate_up_proj [E, d, 2ff] and down_proj [E, ff, d] multiply from the left: inputs on axis -2
    _round(m, {"experts.gate_up_proj": False, "experts.down_proj": False})
    _save("gpt-oss", m, specials, lcpp, tokens)

    torch.manual_seed(2)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    V = 256 + len(MERGES) + len(specials)
    cfg = tf.LlamaConfig(vocab_size=V, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         **{**common, "head_dim": 16})
    m = tf.LlamaForCausalLM(cfg).eval()
    _randomize(m)
    _round(m, {})
    _save("llama31", m, specials, lcpp, tokens)

    torch.manual_seed(3)
    specials = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"]
    V = 256 + len(MERGES) + len(specials)
    cfg = tf.Qwen3Config(vocab_size=V, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-6,
                         rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 256}, **common)
    m = tf.Qwen3ForCausalLM(cfg).eval()
    _randomize(m)
    _round(m, {})
    _save("qwen3-yarn", m, specials, lcpp, tokens)
    (OUT / "README.md").write_text(
        "Tiny random transformers models converted with llama.cpp's convert_hf_to_gguf.py "
        "(tools/make_spark_fixtures.py regenerates them); <name>.npz holds the prompt `tokens` and "
        "transformers' `logits` for it.\n")


def llamacpp_greedy(n_prompt: int = 8, n_new: int = 16) -> dict:
    """llama.cpp's greedy tokens on every fixture, with its top-2 gap at each step."""
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama
    default = C.llama_model_default_params

    def plain():                      # plain ggml-cpu buffers (no AMX/repacked types a sandbox may refuse)
        p = default()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = plain
    out = {"llama_cpp_python": __import__("llama_cpp").__version__, "models": {}}
    for name in ("qwen3moe", "gpt-oss", "llama31", "qwen3-yarn"):
        tokens = [int(t) for t in np.load(OUT / f"{name}.npz")["tokens"][:n_prompt]]
        llm = Llama(model_path=str(OUT / f"{name}.gguf"), n_ctx=64, n_threads=1, n_batch=64, logits_all=True,
                    seed=0, verbose=False)
        llm.reset()
        llm.eval(tokens)
        steps = []
        for _ in range(n_new):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            t1, t2 = (int(i) for i in np.argsort(-logits, kind="stable")[:2])
            steps.append({"id": t1, "second_id": t2, "gap": round(float(logits[t1] - logits[t2]), 4)})
            llm.eval([t1])
        last = np.array(llm.scores[n_prompt - 1], dtype=np.float32)
        out["models"][name] = {"prompt_token_ids": tokens, "token_ids": [st["id"] for st in steps], "steps": steps,
                               "last_prompt_logits": [round(float(v), 5) for v in last]}
        print(name, [st["id"] for st in steps], "min gap", min(st["gap"] for st in steps))
    (OUT / "llamacpp_greedy.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp source folder (has convert_hf_to_gguf.py)")
    ap.add_argument("--llamacpp-greedy", action="store_true", help="record llama.cpp's greedy runs on the fixtures")
    ap.add_argument("--experts", default="F16", choices=["F16", "Q8_0"], help="expert tensor type (default F16)")
    args = ap.parse_args()
    EXPERTS = args.experts
    if args.llamacpp_greedy:
        llamacpp_greedy()
        sys.exit(0)
    if args.llama_cpp is None or not (args.llama_cpp / "convert_hf_to_gguf.py").exists():
        sys.exit(f"no convert_hf_to_gguf.py in {args.llama_cpp}")
    make_all(args.llama_cpp)
    print(json.dumps({"out": str(OUT)}))
