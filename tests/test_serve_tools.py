"""Structured output and tool calls through the official `openai` client, against a real server process
(SmolLM2, temperature 0): response_format json_schema/json_object, tools with tool_choice, errors."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from spark_lab.llm import tools as toolcalls  # noqa: E402
from spark_lab.models import is_present  # noqa: E402

from .server_proc import server_process  # noqa: E402

needs_model = pytest.mark.skipif(not is_present("smollm2-135m-instruct"), reason="SmolLM2 is not installed")

SERVER = """
from spark_lab.serve import ServerConfig, serve
serve(ServerConfig(n_ctx=1024), host="127.0.0.1", port=0, ready=lambda url: print("READY", url, flush=True))
"""
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Today's weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client():
    if not is_present("smollm2-135m-instruct"):
        pytest.skip("SmolLM2 is not installed")
    with server_process(SERVER) as (url, _):
        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)


def _chat(client, **kw):
    return client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=64, **kw)


def test_response_format_json_schema(client):
    r = _chat(client, messages=[{"role": "user", "content": "Describe a person."}],
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.choices[0].finish_reason == "stop"
    # json_object as OpenAI documents it: the prompt itself asks for JSON (a bare "Describe a person." lets the
    # model write one unbounded string, which ran out of tokens on the strict device's float32 numbers)
    r = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=200,
                                       messages=[{"role": "user", "content":
                                                  "Describe a person as a JSON object with a name and an age."}],
                                       response_format={"type": "json_object"}, seed=1,
                                       extra_body={"repetition_penalty": 1.3})
    assert isinstance(json.loads(r.choices[0].message.content), dict) and r.choices[0].finish_reason == "stop"


def test_required_tool_call(client):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    r = _chat(client, messages=msgs, tools=[ADD, WEATHER], tool_choice="required")
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("add", "weather")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, {ADD["function"]["name"]: ADD, "weather": WEATHER}[call.function.name]["function"]["parameters"])


def test_named_tool_call_streamed(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    stream = _chat(client, messages=msgs, tools=[ADD, WEATHER], stream=True,
                   tool_choice={"type": "function", "function": {"name": "weather"}})
    name, args, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "weather" and finish == "tool_calls"
    assert set(json.loads(args)) == {"city"}


def test_tool_loop_with_result(client):
    """A tool result goes back in; with tool_choice none the model answers in text."""
    msgs = [{"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = _chat(client, messages=msgs, tools=[ADD], tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


@pytest.mark.parametrize("body, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}}, "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}}}, "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 9,
                                                                           "maximum": 1}}}}, "Unsatisfiable"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "needs 'tools'"),
])
def test_bad_requests_are_400(client, body, words):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, messages=[{"role": "user", "content": "hi"}], **body)
    assert words in e.value.body["message"]


def test_parse_formats():
    tools = [ADD]
    content, calls = toolcalls.parse('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
                                     "qwen", tools)
    assert content == "" and calls[0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    text = '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a":1,"b":2}<|call|>'
    content, calls = toolcalls.parse(text, "harmony", tools)
    assert calls[0]["function"] == {"name": "add", "arguments": '{"a":1,"b":2}'}
    content, calls = toolcalls.parse('{"name": "add", "arguments": {"a": 1}}', "json", tools)
    assert calls[0]["function"]["name"] == "add"
    content, calls = toolcalls.parse('{"name": "other", "arguments": {}}', "json", tools)
    assert calls == [] and content.startswith("{")


def test_tool_formats_of_real_templates():
    from pathlib import Path
    d = Path(__file__).parent / "data" / "templates"
    assert toolcalls.tool_format((d / "qwen3.jinja").read_text()) == "qwen"
    assert toolcalls.tool_format((d / "gpt-oss.jinja").read_text()) == "harmony"
    assert toolcalls.tool_format(None) == "json"


@needs_model
def test_qwen_grammar_forces_a_call():
    """The Lark grammar used for Qwen3's format, over SmolLM2's vocabulary: the output is a parseable call."""
    from spark_lab.llm import LLM
    llm = LLM.load(n_ctx=256)
    g = llm.generate("What is 2 + 3?", max_new_tokens=48, temperature=0, **toolcalls.constraint_args([ADD], "qwen"))
    content, calls = toolcalls.parse(g.text, "qwen", [ADD])
    assert g.finish_reason == "stop" and calls and calls[0]["function"]["name"] == "add"


TOOL_CONVERSATION = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
]


@pytest.mark.parametrize("template", ["qwen3", "gpt-oss"])
def test_tool_conversations_render_as_transformers(template):
    """tools.prepare + our template renderer == transformers' rendering of the same conversation (real templates)."""
    from pathlib import Path
    from types import SimpleNamespace

    from spark_lab.llm.template import render_chat
    cu = pytest.importorskip("transformers.utils.chat_template_utils")
    source = (Path(__file__).parent / "data" / "templates" / f"{template}.jinja").read_text()
    fmt = toolcalls.tool_format(source)
    msgs, options = toolcalls.prepare(TOOL_CONVERSATION, [ADD, WEATHER], fmt)
    ours = render_chat(SimpleNamespace(chat_template=source, bos_id=None, eos_id=None), msgs, True, **options)
    ref, _ = cu.render_jinja_template([msgs], chat_template=source, add_generation_prompt=True, **options)
    assert ours == ref[0]
    assert ("<tool_response>\n5\n</tool_response>" if template == "qwen3" else "functions.add") in ours
    assert '"a": 2' in ours or '"a":2' in ours


def test_json_format_prompt_lists_the_tools():
    msgs, options = toolcalls.prepare(TOOL_CONVERSATION, [ADD], "json")
    assert options == {} and msgs[0]["role"] == "system" and '"name": "add"' in msgs[0]["content"]
    assert json.loads(msgs[2]["content"]) == {"name": "add", "arguments": {"a": 2, "b": 3}}


@pytest.mark.parametrize("fmt", ["harmony", "think"])
def test_forced_calls_in_the_models_own_format(tmp_path, fmt):
    """Tiny Qwen3 GGUFs with gpt-oss's / Qwen3's real templates and vocabularies (random walks at
    temperature 0.8): with the call grammar every output is a call to the named tool whose arguments
    validate, written in the model's format (harmony's markers as control tokens)."""
    from spark_lab.llm import LLM

    from .llm.thinking_model import write_thinking_gguf
    llm = LLM(write_thinking_gguf(tmp_path / f"{fmt}.gguf", fmt), n_ctx=2048)   # a byte vocabulary: long prompts
    tf = toolcalls.tool_format(llm.tokenizer.chat_template)
    assert tf == {"harmony": "harmony", "think": "qwen"}[fmt]
    msgs, options = toolcalls.prepare([{"role": "user", "content": "Weather in Oslo?"}], [ADD, WEATHER], tf)
    ids = llm.encode_chat(msgs, **options, **({"enable_thinking": False} if fmt == "think" else {}))
    for seed in range(3):
        g = llm.generate(ids, max_new_tokens=200, temperature=0.8, seed=seed,
                         **toolcalls.constraint_args([ADD, WEATHER], tf, "weather"))
        raw = toolcalls.raw_text(llm, g)
        _, calls = toolcalls.parse(raw, tf, [ADD, WEATHER])
        assert g.finish_reason == "stop" and len(calls) == 1, raw
        assert calls[0]["function"]["name"] == "weather"
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER["function"]["parameters"])
        if fmt == "harmony":
            assert raw.startswith("<|channel|>commentary to=functions.weather <|constrain|>json<|message|>{")
        else:
            assert raw.startswith("<tool_call>\n{") and raw.endswith("}\n</tool_call>")
