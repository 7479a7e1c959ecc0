"""Reasoning output: the real Qwen3 and gpt-oss chat templates (rendered as transformers renders them),
the streaming splitter on every way a text can arrive in pieces, and a tiny Qwen3 that thinks."""
from __future__ import annotations

import codecs
import io
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest

from spark_lab.llm import LLM, ChatSession
from spark_lab.llm.cli import DIM, RESET, PieceWriter
from spark_lab.llm.reasoning import ReasoningPiece, ReasoningSplitter, reasoning_format, split_reasoning
from spark_lab.llm.template import CHATML, TemplateError, render_chat

from .thinking_model import TEMPLATES, write_thinking_gguf

QWEN3 = (TEMPLATES / "qwen3.jinja").read_text()
GPT_OSS = (TEMPLATES / "gpt-oss.jinja").read_text()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "required": ["city"], "properties": {
                                               "city": {"type": "string", "description": "City <name>"},
                                               "unit": {"type": "string", "enum": ["C", "F"], "description": "unit",
                                                        "default": "C"}}}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back", "thinking": "greet back"},
     {"role": "user", "content": "Ça va? ✓"}],
    [{"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>\nthey greet\n</think>\n\nHello!"}, {"role": "user", "content": "Bye"}],
]


def _transformers(template, messages, **kw):
    cu = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = cu.render_jinja_template([messages], chat_template=template, **kw)
    return rendered[0]


@pytest.mark.parametrize("template", ["qwen3", "gpt-oss"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("options", [{}, {"enable_thinking": False}, {"reasoning_effort": "high"},
                                     {"tools": TOOLS}])
def test_real_templates_render_as_transformers(template, conv, options):
    source = QWEN3 if template == "qwen3" else GPT_OSS
    tok = SimpleNamespace(chat_template=source, bos_id=None, eos_id=None)
    messages = CONVERSATIONS[conv]
    ours = render_chat(tok, messages, True, **options)
    assert ours == _transformers(source, messages, add_generation_prompt=True, **options)
    if template == "qwen3":
        assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n" if options.get("enable_thinking") is False
                             else "<|im_start|>assistant\n")
        assert "greet back" not in ours and "they greet" not in ours      # earlier turns' thinking is dropped
    else:
        assert ours.endswith("<|start|>assistant")
        assert f"Reasoning: {options.get('reasoning_effort', 'medium')}\n" in ours
        assert ("type get_weather = (_: {" in ours) == ("tools" in options)   # tojson/namespace/macros at work


def test_gpt_oss_training_turn_and_refusal():
    tok = SimpleNamespace(chat_template=GPT_OSS, bos_id=None, eos_id=None)
    turn = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "thinking": "add them"}]
    ours = render_chat(tok, turn, add_generation_prompt=False)
    assert ours == _transformers(GPT_OSS, turn, add_generation_prompt=False)
    assert ours.endswith("<|start|>assistant<|channel|>analysis<|message|>add them<|end|>"
                         "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    bad = [{"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "<|channel|>analysis<|message|>x<|end|>"}, {"role": "user", "content": "?"}]
    with pytest.raises(TemplateError, match="chat template: You have passed a message containing <|channel|>"):
        render_chat(tok, bad)


def test_reasoning_format_of_templates():
    assert reasoning_format(QWEN3) == "think"
    assert reasoning_format(GPT_OSS) == "harmony"
    assert reasoning_format(CHATML) is None and reasoning_format(None) is None
    with pytest.raises(ValueError, match="unknown reasoning format 'xml'"):
        ReasoningSplitter("xml")


CASES = [  # (format, prompt tail, generated text, reasoning, answer)
    ("think", "<|im_start|>assistant\n", "<think>\nLet me add.\n2+2=4\n</think>\n\nThe answer is 4.",
     "Let me add.\n2+2=4", "The answer is 4."),
    ("think", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "Four.", "", "Four."),
    ("think", "<|im_start|>assistant\n<think>\n", "opened by the prompt\n</think>\nYes", "opened by the prompt", "Yes"),
    ("think", "<|im_start|>assistant\n", "No thinking, and a literal </think> later.", "",
     "No thinking, and a literal </think> later."),
    ("think", "<|im_start|>assistant\n", "<think>\ncut off by max_new_tokens </thi", "cut off by max_new_tokens </thi", ""),
    ("harmony", "<|start|>assistant",
     "<|channel|>analysis<|message|>User asks 2+2. Simple.<|end|><|start|>assistant<|channel|>final<|message|>4 ✓",
     "User asks 2+2. Simple.", "4 ✓"),
    ("harmony", "<|start|>assistant",
     "<|channel|>analysis<|message|>first<|end|><|start|>assistant<|channel|>analysis<|message|>second<|end|>"
     "<|start|>assistant<|channel|>final<|message|>done<|return|>", "first\nsecond", "done"),
    ("harmony", "<|start|>assistant<|channel|>final<|message|>", "Straight to the answer.", "",
     "Straight to the answer."),
    ("harmony", "<|start|>assistant", "no markers at all", "", "no markers at all"),
]


@pytest.mark.parametrize("fmt,tail,text,reasoning,answer", CASES)
def test_splitter_whatever_the_pieces(fmt, tail, text, reasoning, answer):
    assert split_reasoning(text, fmt, tail) == (reasoning, answer)
    cuts = [[1] * len(text)] + [[i, len(text)] for i in range(1, len(text))]   # char by char, and every cut in two
    cuts += [[3] * len(text), [7] * len(text)]
    for sizes in cuts:
        s, parts, at = ReasoningSplitter(fmt, tail), [], 0
        for n in sizes:
            if at >= len(text):
                break
            parts += s.push(text[at:at + n])
            at += n
        parts += s.flush()
        assert s.result == (reasoning, answer), sizes
        joined = {k: "".join(p for kk, p in parts if kk == k) for k in ("reasoning", "text")}
        assert (joined["reasoning"], joined["text"]) == (reasoning, answer)    # what streamed is the result
        kinds = [k for k, _ in parts]
        assert kinds == sorted(kinds, key=lambda k: k != "reasoning") or fmt == "harmony"   # think: reasoning first


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("thinking")
    return {"think": LLM.load(str(write_thinking_gguf(d / "think.gguf")), n_ctx=256),
            "harmony": LLM.load(str(write_thinking_gguf(d / "harmony.gguf", fmt="harmony")), n_ctx=256)}


def test_harmony_token_stream(models):
    """The gpt-oss output as the tokenizer cuts it (control tokens whole, text in byte tokens: an
    accented letter split across two), decoded token by token as the engine does."""
    tok = models["harmony"].tokenizer
    assert models["harmony"].reasoning_format == "harmony"
    eog = {tok.decode([i]) for i in tok.eot_ids}
    assert {"<|return|>", "<|call|>"} <= eog and "<|end|>" not in eog      # <|end|> closes a message only
    out = ("<|channel|>analysis<|message|>The user writes in French: réponds.<|end|><|start|>assistant"
           "<|channel|>final<|message|>Très bien : 4.")
    ids = tok.encode(out, add_bos=False, parse_special=True)
    assert tok.encode("<|channel|>", add_bos=False, parse_special=True) == [tok.special_tokens["<|channel|>"]]
    assert len(tok.encode("é", add_bos=False)) == 2                        # byte tokens: é comes in two pieces
    prompt = models["harmony"].apply_chat_template([{"role": "user", "content": "2+2?"}])
    s, dec, parts = ReasoningSplitter("harmony", prompt[-200:]), codecs.getincrementaldecoder("utf-8")(), []
    for i in ids:
        parts += s.push(dec.decode(tok.token_bytes(i)))
    parts += s.flush()
    assert s.result == ("The user writes in French: réponds.", "Très bien : 4.")
    assert [k for k, _ in itertools.groupby(k for k, _ in parts)] == ["reasoning", "text"]


def test_qwen3_thinks_end_to_end(models):
    """The tiny Qwen3 walks '<think>Hm</think>\\n\\nOK' greedily; the engine splits it as it streams."""
    llm = models["think"]
    tok = llm.tokenizer
    msgs = [{"role": "user", "content": "Hi?"}]
    g = llm.generate(msgs, max_new_tokens=16, temperature=0)
    assert tok.decode(g.token_ids) == "<think>Hm</think>\n\nOK" and g.finish_reason == "stop"
    assert (g.reasoning, g.text) == ("Hm", "OK")
    pieces = list(llm.stream(msgs, max_new_tokens=16, temperature=0))
    assert [(type(p) is ReasoningPiece, str(p)) for p in pieces] == [(True, "H"), (True, "m"), (False, "O"), (False, "K")]
    raw = [p for _, p in llm.stream_tokens(llm.encode_chat(msgs), 16, temperature=0, reasoning=False)]
    assert "".join(raw) == "<think>Hm</think>\n\nOK" and not any(isinstance(p, ReasoningPiece) for p in raw)
    off = llm.generate(msgs, max_new_tokens=16, temperature=0, template_options={"enable_thinking": False})
    assert tok.decode(off.prompt_token_ids).endswith("<think>\n\n</think>\n\n")
    assert (off.reasoning, off.text, tok.decode(off.token_ids)) == ("", "OK", "OK")


def test_chat_session_keeps_answers_only(models):
    llm = models["think"]
    session = ChatSession(llm)
    assert session.send("Hi?", max_new_tokens=16, temperature=0) == "OK"        # the answer, not the thinking
    assert (session.last.reasoning, session.last.text) == ("Hm", "OK")
    assert session.history[-1] == {"role": "assistant", "content": "OK"}
    session.send("Again?", max_new_tokens=16, temperature=0)
    prompt = llm.tokenizer.decode(session.last.prompt_token_ids)
    assert "<|im_start|>assistant\nOK<|im_end|>\n<|im_start|>user\nAgain?" in prompt and "Hm" not in prompt
    quiet = ChatSession(llm, template_options={"enable_thinking": False})
    quiet.send("Hi?", max_new_tokens=16, temperature=0)
    assert (quiet.last.reasoning, quiet.last.text) == ("", "OK")


def test_terminal_shows_reasoning_dimmed():
    out = io.StringIO()
    w = PieceWriter(out, tty=True)
    for p in (ReasoningPiece("H"), ReasoningPiece("m"), "O", "K"):
        w.write(p)
    w.close()
    assert out.getvalue() == f"{DIM}Hm{RESET}\n\nOK"
    out = io.StringIO()
    w = PieceWriter(out, tty=True)
    w.write(ReasoningPiece("cut off"))                       # max_new_tokens inside the thinking
    w.close()
    assert out.getvalue() == f"{DIM}cut off{RESET}"


def test_cli_chat_and_generate(models, monkeypatch, capsys):
    from spark_lab.cli import main
    path = str(models["think"].path)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi?\n/think off\nHi?\n\n"))
    assert main(["chat", "--model", path, "--temperature", "0", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr()
    assert out.out.count("bot> ") == 2
    assert "bot> [thinking] Hm\n[answer] OK\n" in out.out and "bot> OK\n" in out.out   # not a TTY: marked in words
    assert "/think on|off" in out.err
    assert main(["generate", "--model", path, "--temperature", "0", "--max-new-tokens", "16", "--json", "Hi?"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert (g["reasoning"], g["text"]) == ("Hm", "OK")
    assert main(["generate", "--model", path, "--temperature", "0", "--max-new-tokens", "16", "--json", "--raw",
                 "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert (g["reasoning"], g["text"]) == ("", "<think>Hm</think>\n\nOK")


def test_chatbox_shows_reasoning_collapsed(models):
    pytest.importorskip("ipywidgets")
    from spark_lab.widgets import ChatBox
    box = ChatBox(models["think"], max_new_tokens=16, temperature=0)
    assert box.send("Hi?") == "OK"
    html = box.transcript.value
    answer = html[html.rindex('<div class="spark-msg spark-assistant">'):]
    assert answer.startswith('<div class="spark-msg spark-assistant">OK<details class="spark-reasoning">'
                             '<summary>reasoning</summary>Hm</details>')          # collapsed, under the answer
    assert box.reasoning == ["Hm"] and box.turns == [("Hi?", "OK")]
    box._render("next", "", "thinking so far")                                  # while it thinks: open
    assert '<details class="spark-reasoning" open><summary>reasoning</summary>thinking so far' in box.transcript.value


def test_gpt_oss_template_end_to_end(models):
    """The tiny model with gpt-oss's real template (strftime_now in the system message) walks
    <|channel|>final<|message|>OK and stops at <|return|>: the header is structure, not text."""
    llm = models["harmony"]
    msgs = [{"role": "user", "content": "2+2?"}]
    prompt = llm.apply_chat_template(msgs, reasoning_effort="low")
    assert "Reasoning: low\n" in prompt and prompt.endswith("<|start|>user<|message|>2+2?<|end|><|start|>assistant")
    g = llm.generate(msgs, max_new_tokens=16, temperature=0)
    assert llm.tokenizer.decode(g.token_ids) == "<|channel|>final<|message|>OK" and g.finish_reason == "stop"
    assert (g.reasoning, g.text) == ("", "OK")
    assert [str(p) for p in llm.stream(msgs, max_new_tokens=16, temperature=0)] == ["O", "K"]


def test_expert_choices_from_recorded_routes():
    """llm.moe.expert_choices: per layer, the experts each token ran (the notebook's heatmap)."""
    from pathlib import Path
    from spark_lab.llm.moe import expert_choices, expert_hits
    llm = LLM.load(str(Path(__file__).parents[1] / "fixtures" / "spark" / "qwen3moe.gguf"), n_ctx=64)
    c = llm.config
    llm.model.moe_stats = {}
    g = llm.generate(list(range(40, 49)), max_new_tokens=5, temperature=0)
    chosen = expert_choices(llm.model.moe_stats, c.n_layer, c.n_expert)
    assert chosen.shape == (c.n_layer, 9 + len(g.token_ids) - 1, c.n_expert)    # prompt + forwarded new tokens
    assert (chosen.sum(axis=2) == c.n_expert_used).all()
    assert (chosen.sum(axis=1) == expert_hits(llm.model.moe_stats, c.n_layer, c.n_expert)).all()
    layer0 = [ids for layer, ids in llm.model.moe_stats["routes"] if layer == 0]
    assert chosen[0, :9][np.arange(9)[:, None], layer0[0]].all()               # the prompt's row block
    assert expert_choices({}, 2, 8).shape == (2, 0, 8)
