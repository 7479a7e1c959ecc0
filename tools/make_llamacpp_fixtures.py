"""Record llama.cpp's tokenization and greedy generation for the shipped GGUFs.

The LLM engine and the tokenizer are tested against these JSON files (tests/fixtures/):

  llamacpp_tokens_<model>.json    >= 300 strings tokenized with every (add_special, parse_special)
                                  combination, llama.cpp's detokenization, its EOG token set
  llamacpp_tokens_variants.json   the same machinery on vocab-only GGUFs made from the shipped
                                  vocabularies with another `tokenizer.ggml.pre` (gpt2, default,
                                  llama-bpe, qwen2) or with add_space_prefix on (Llama-2 style SPM)
  llamacpp_generate_<model>.json  greedy (temperature 0) generations: prompt string and ids,
                                  32 new tokens, the top-2 logits and their gap at every step,
                                  first 16 logits of position 0 and the top-20 of the last prompt
                                  position of every prompt

Run it with the separate llama-cpp-python venv, never the kit's (llama_cpp is no dependency
of spark_lab):

    /tmp/llvenv/bin/python tools/make_llamacpp_fixtures.py [--smollm PATH] [--gemma PATH]

Without paths it asks the kit's .venv where `spark_lab.models.resolve` finds the models.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


# ------------------------------------------------------------------ the strings

def fixture_strings() -> list[str]:
    """Hand-picked cases for every corner of both tokenizers, then seeded random mixtures."""
    s = [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "a", "A", "Hello", " Hello", "Hello ",
        "Hello world", "Hello, world!", "hello world.", "HELLO WORLD", "Hello  world", "Hello   world",
        "Hello\tworld", "Hello\nworld", "Hello\n\nworld", "Hello\r\nworld", "  leading spaces", "trailing spaces  ",
        "The quick brown fox jumps over the lazy dog.", "I'm sure you've seen it, they'll say we'd done it.",
        "DON'T SHOUT, it's FINE'S", "can't won't shouldn't", "'s 't 're 've 'm 'll 'd", "'quoted' \"double\"",
        "0", "1", "12", "123", "1234", "12345", "123456789", "3.14159", "-42", "+7", "1,000,000", "2024-11-29",
        "12:34:56", "0x1F 0b1010 1e-5 6.02e23", "v1.2.3", "$100.00 and 50%", "1st 2nd 3rd 4th",
        "99 bottles of beer on the wall", "31415926535897932384626433832795028841971",
        "a1b2c3", "abc123def456", "x = 10 + 20 * 3", "phone: +1 (555) 123-4567",
        "    ", "     ", "        ", "\t\t", "\t\t\t\t", "\n\n\n", "\n\n\n\n\n\n", " \t \n ", "a\n\n\n\nb",
        "line one\nline two\nline three", "tab\tseparated\tvalues", "mixed \t\n  whitespace", "end with newline\n",
        "def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)",
        "if (a && b) { return c; } else { return d; }", "#include <stdio.h>\nint main() { return 0; }",
        "const add = (a, b) => a + b;", "SELECT * FROM users WHERE id = 42;", "<div class=\"x\">hi</div>",
        "<html><body><p>text</p></body></html>", "{\"key\": [1, 2, 3], \"ok\": true}", "a_b_c snake_case camelCase",
        "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Users\\name\\file.txt", "~/dir/file.py",
        "x**2 + y**2 == z**2", "!!!???...", "...", "—", "–-", "«guillemets»", "¿Qué?", "¡Hola!",
        "(parenthetical) [bracketed] {braced}", "a+b=c", "@#$%^&*()", "===", "---", "___", "***", "|||", "~~~",
        "café", "naïve", "résumé", "Ångström", "Crème brûlée", "façade", "Zürich", "São Paulo", "Łódź", "smörgåsbord",
        "Ελληνικά", "Привет, мир!", "Съешь же ещё этих мягких французских булок.", "Україна", "Здравствуйте",
        "你好", "你好，世界！", "我爱自然语言处理。", "中文和English混合", "日本語のテキスト", "カタカナ ひらがな 漢字",
        "한국어 텍스트", "안녕하세요", "مرحبا بالعالم", "السلام عليكم ورحمة الله", "שלום עולם", "नमस्ते दुनिया",
        "हिन्दी भाषा बहुत सुंदर है।", "বাংলা", "தமிழ்", "ไทย ภาษาไทย", "Tiếng Việt có dấu", "ქართული", "Հայերեն",
        "🙂", "🤖", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "I ❤️ NY", "emoji 😀😃😄😁 run", "✓ ✗ ★ ☆ ♥", "∑ ∫ √ ∞ ≠ ≤ ≥", "αβγ δ",
        "€ £ ¥ ₹ ₿", "°C ± µ", "½ ¼ ¾", "™ © ®", "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "soft\u00adhyphen",
        "\u3000ideographic space", "combining e\u0301 accent", "A\u030a", "\ufeffBOM", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝓗𝓮𝓵𝓵𝓸",
        "<0x41>", "<0x0A>", "▁", "▁▁hello", "▁ ▁", "Ġhello", "Ċ", "<unk>", "<s>", "</s>", "<pad>", "<mask>",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "text<|im_end|>more", "<|im_start|><|im_start|>", "< |im_start| >", "<|im_start", "im_start|>",
        "<repo_name>x<file_sep>y", "<reponame>", "<jupyter_code>print(1)", "<bos>", "<eos>", "<bos>text", "text<eos>",
        "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n", "<start_of_turn>", "<end_of_turn>",
        "<start_of_image>", "[multimodal]", "<unused0>", "<unused99>", "<div>", "</div>", "<table><tr><td>",
        "<start_of_turn>user\n你好<end_of_turn>", " <start_of_turn> spaced <end_of_turn> ", "<end_of_turn><eos>",
        "a<|im_end|>b<end_of_turn>c", "<<|im_end|>>", "<|im_end|><|im_end|>",
    ]
    words = ["the", "model", "runs", "on", "NumPy", "and", "CuPy", "tokens", "per", "second", "GPU", "память",
             "模型", "ノート", "été", "नमस्ते", "🙂", "42", "3.5", "x_y", "(", ")", ",", ".", "'s", "\n", "\t", "  ",
             "<|im_end|>", "<end_of_turn>", "über", "naïve", "ÆØÅ", "——", "#!", "//", "==", "0x", "日本"]
    rng = random.Random(1234)
    while len(s) < 330:
        n = rng.randint(2, 14)
        seps = [" ", " ", " ", "", "\n", "  ", "\t"]
        s.append("".join(rng.choice(words) + rng.choice(seps) for _ in range(n)))
    # a few longer paragraphs
    s.append("SmolLM2 is a family of compact language models. " * 6)
    s.append("Gemma 3 270M uses a 262,144-token vocabulary with byte fallback; 2 + 2 = 4.\n" * 4)
    s.append("".join(chr(c) for c in range(32, 127)))
    s.append("".join(chr(c) for c in range(0xA0, 0x180)))
    s.append("\x00\x01\x07\x1b[0m control chars")
    return s


# ------------------------------------------------------------------ llama.cpp helpers

def _vocab(llm):
    import llama_cpp
    return llama_cpp.llama_model_get_vocab(llm.model)


def tokenize(llm, text: str, add_special: bool, parse_special: bool) -> list[int]:
    return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)]


def detokenize(llm, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
    import llama_cpp
    vocab = _vocab(llm)
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, -n, remove_special, unparse_special)
    return buf.raw[:n]


def vocab_facts(llm) -> dict:
    import llama_cpp
    vocab = _vocab(llm)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    control = [i for i in range(n) if llama_cpp.llama_vocab_is_control(vocab, i)]
    return {"n_vocab": n, "bos": llama_cpp.llama_vocab_bos(vocab), "eos": llama_cpp.llama_vocab_eos(vocab),
            "eot": llama_cpp.llama_vocab_eot(vocab), "eog_ids": eog, "n_control": len(control),
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
            "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab))}


def token_cases(llm, strings: list[str], facts: dict) -> list[dict]:
    """One record per string; fields that only repeat another are left out (see `expand` in the test)."""
    prefix = [facts["bos"]] if facts["add_bos"] else []
    suffix = [facts["eos"]] if facts["add_eos"] else []
    cases = []
    for text in strings:
        plain = tokenize(llm, text, False, False)
        special = tokenize(llm, text, False, True)
        c = {"text": text, "ids": plain}
        if special != plain:
            c["ids_special"] = special
        for parse, base, key in ((False, plain, "ids_add_special"), (True, special, "ids_add_special_parse")):
            full = tokenize(llm, text, True, parse)
            if full != prefix + base + suffix:
                c[key] = full
        for ids, key in ((plain, "decoded"), (special, "decoded_special")):
            d = detokenize(llm, ids, False, True)
            if d != text.encode("utf-8") and not (key == "decoded_special" and special == plain):
                c[key] = d.decode("utf-8", "backslashreplace")
        if special != plain:
            c["decoded_special_skip"] = detokenize(llm, special, False, False).decode("utf-8", "backslashreplace")
        cases.append(c)
    return cases


def load_vocab_only(path):
    from llama_cpp import Llama
    return Llama(model_path=str(path), vocab_only=True, verbose=False)


# ------------------------------------------------------------------ generation

SMOLLM_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about a GPU."}],
    [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],
    [{"role": "user", "content": "Translate to French: good morning, my friend."}],
]
GEMMA_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
]


def render_chat(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """The chat template rendered as llama.cpp's Jinja chat formatter does (add_generation_prompt)."""
    import jinja2
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)


def greedy(llm, prompt_ids: list[int], eog: set[int], max_new_tokens: int = 32) -> dict:
    llm.reset()
    llm.eval(prompt_ids)
    scores = llm.scores  # [n_ctx, n_vocab] float32, row i = logits after token i (logits_all)
    first16 = [round(float(x), 4) for x in scores[0, :16]]
    last = np.array(scores[len(prompt_ids) - 1], dtype=np.float32)
    top20 = np.argsort(-last, kind="stable")[:20]
    steps = []
    for _ in range(max_new_tokens):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        order = np.argsort(-logits, kind="stable")[:2]
        t1, t2 = int(order[0]), int(order[1])
        steps.append({"id": t1, "top1": round(float(logits[t1]), 4), "second_id": t2,
                      "second": round(float(logits[t2]), 4), "gap": round(float(logits[t1] - logits[t2]), 4)})
        if t1 in eog:
            break
        llm.eval([t1])
    ids = [s["id"] for s in steps]
    return {"prompt_token_ids": prompt_ids, "token_ids": ids,
            "finish_reason": "stop" if ids and ids[-1] in eog else "length",
            "text": llm.detokenize(ids).decode("utf-8", "replace"),
            "steps": steps, "first_position_logits16": first16,
            "last_prompt_top20": {"ids": [int(i) for i in top20], "logits": [round(float(last[i]), 4) for i in top20]},
            "min_gap": min(s["gap"] for s in steps)}


def _plain_cpu_weights() -> None:
    """Load weights without llama.cpp's extra CPU buffer types (AMX tiles, repacked blocks).

    On a CPU that reports AMX but runs in a sandbox that does not allow it, the AMX path dies
    with SIGILL; the plain ggml-cpu kernels give the reference the kit's engine is held to."""
    import llama_cpp.llama_cpp as C
    if getattr(C.llama_model_default_params, "_plain", False):
        return
    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    params._plain = True
    C.llama_model_default_params = params


def generate_fixture(path: Path, name: str, kind: str) -> dict:
    from llama_cpp import Llama
    import llama_cpp
    _plain_cpu_weights()
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=2, n_batch=512, logits_all=True, seed=0, verbose=False)
    facts = vocab_facts(llm)
    eog = set(facts["eog_ids"])
    runs = []
    if kind == "chat":
        template = llm.metadata["tokenizer.chat_template"]
        bos = llm.detokenize([facts["bos"]], special=True).decode()
        eos = llm.detokenize([facts["eos"]], special=True).decode()
        for messages in SMOLLM_CHATS:
            prompt = render_chat(template, messages, bos, eos)
            ids = tokenize(llm, prompt, True, True)  # as llama.cpp's chat: add_special, parse_special
            runs.append({"messages": messages, "prompt": prompt, **greedy(llm, ids, eog)})
    else:
        for prompt in GEMMA_PROMPTS:
            ids = tokenize(llm, prompt, True, True)  # BOS added by the GGUF's add_bos_token
            runs.append({"prompt": prompt, **greedy(llm, ids, eog)})
    return {"model": name, "llama_cpp_version": llama_cpp.__version__, "gguf": file_facts(path),
            "settings": {"n_ctx": 2048, "n_threads": 2, "n_batch": 512, "temperature": 0, "max_new_tokens": 32,
                         "stop": "llama.cpp EOG set", "use_extra_bufts": False},
            "eog_ids": facts["eog_ids"], "runs": runs}


# ------------------------------------------------------------------ variants (other `pre` values)

def write_vocab_gguf(src: Path, dst: Path, overrides: dict) -> None:
    """A tensor-free GGUF holding `src`'s architecture and tokenizer keys, some replaced."""
    import gguf
    r = gguf.GGUFReader(str(src))
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if not (key.startswith("tokenizer.") or key.startswith(arch + ".") or key.startswith("general.")):
            continue
        if key in overrides:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                val = [bytes(field.parts[i]) for i in field.data]
            else:
                val = field.contents()
            w.add_key_value(key, val, vtype, sub_type=sub)
        else:
            w.add_key_value(key, field.contents(), vtype)
    for key, (val, vtype) in overrides.items():
        w.add_key_value(key, val, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def variant_fixture(smollm: Path, gemma: Path, strings: list[str]) -> dict:
    import gguf
    S = gguf.GGUFValueType
    variants = [("smollm2-135m-instruct", smollm, "pre=gpt2", {"tokenizer.ggml.pre": ("gpt-2", S.STRING)}),
                ("smollm2-135m-instruct", smollm, "pre=default", {"tokenizer.ggml.pre": ("default", S.STRING)}),
                ("smollm2-135m-instruct", smollm, "pre=llama-bpe", {"tokenizer.ggml.pre": ("llama-bpe", S.STRING)}),
                ("smollm2-135m-instruct", smollm, "pre=qwen2", {"tokenizer.ggml.pre": ("qwen2", S.STRING)}),
                ("gemma3-270m", gemma, "add_space_prefix=true",
                 {"tokenizer.ggml.add_space_prefix": (True, S.BOOL)})]
    out = []
    with tempfile.TemporaryDirectory() as d:
        for base, src, label, overrides in variants:
            dst = Path(d) / f"{label.replace('=', '_')}.gguf"
            write_vocab_gguf(src, dst, overrides)
            llm = load_vocab_only(dst)
            facts = vocab_facts(llm)
            subset = strings if base.startswith("smollm") else strings[:120]
            out.append({"base": base, "label": label,
                        "overrides": {k: v for k, (v, _) in overrides.items()},
                        "facts": {k: v for k, v in facts.items() if k != "eog_ids"},
                        "cases": token_cases(llm, subset, facts)})
            del llm
    return {"llama_cpp_version": __import__("llama_cpp").__version__, "variants": out}


# ------------------------------------------------------------------ main

def file_facts(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return {"file": Path(path).name, "size": Path(path).stat().st_size, "sha256": h.hexdigest()}


def default_paths() -> tuple[str | None, str | None]:
    py = REPO / ".venv" / "bin" / "python"
    if not py.exists():
        return None, None
    code = ("from spark_lab.models import resolve; "
            "print(resolve('smollm2-135m-instruct')); print(resolve('gemma3-270m'))")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    return out[0], out[1]


def dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KB)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm")
    ap.add_argument("--gemma")
    ap.add_argument("--only", choices=["tokens", "variants", "generate"], action="append")
    args = ap.parse_args(argv)
    if not (args.smollm and args.gemma):
        d_smollm, d_gemma = default_paths()
        args.smollm, args.gemma = args.smollm or d_smollm, args.gemma or d_gemma
    if not (args.smollm and args.gemma):
        raise SystemExit("pass --smollm and --gemma (GGUF paths)")
    only = set(args.only or ["tokens", "variants", "generate"])
    FIXTURES.mkdir(parents=True, exist_ok=True)
    strings = fixture_strings()
    models = [("smollm2-135m-instruct", Path(args.smollm), "chat"), ("gemma3-270m", Path(args.gemma), "raw")]
    import llama_cpp
    if "tokens" in only:
        for name, path, _ in models:
            llm = load_vocab_only(path)
            facts = vocab_facts(llm)
            dump({"model": name, "llama_cpp_version": llama_cpp.__version__, "gguf": file_facts(path),
                  "facts": facts, "cases": token_cases(llm, strings, facts)},
                 FIXTURES / f"llamacpp_tokens_{name.split('-')[0]}.json")
    if "variants" in only:
        dump(variant_fixture(Path(args.smollm), Path(args.gemma), strings), FIXTURES / "llamacpp_tokens_variants.json")
    if "generate" in only:
        for name, path, kind in models:
            dump(generate_fixture(path, name, kind), FIXTURES / f"llamacpp_generate_{name.split('-')[0]}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
