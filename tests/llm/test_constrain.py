"""Constrained decoding (llm/constrain.py) with SmolLM2: every output parses, validates against its
JSON Schema (jsonschema) and ends because the grammar is complete; bad schemas get one clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from spark_lab.llm.constrain import Constraint, GrammarError, tool_call_schema  # noqa: E402
from spark_lab.llm.sampling import SamplingParams, sample  # noqa: E402
from spark_lab.models import is_present  # noqa: E402

needs_model = pytest.mark.skipif(not is_present("smollm2-135m-instruct"), reason="SmolLM2 is not installed")

S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}},
     "required": ["price"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                                                          "maximum": 999},
                                                                               "name": S},
                                                "required": ["id", "name"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"a": S, "b": S}, "required": ["a"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 8}]},
    {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1},
                                      "y": {"type": "number", "minimum": -1, "maximum": 1}},
     "required": ["x", "y"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"const": "done"}, "count": {"type": "integer", "minimum": 0,
                                                                              "maximum": 10}},
     "required": ["status", "count"], "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 1, "maximum": 5},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "note": S}, "required": ["level"],
     "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"pet": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1,
                                                                               "maximum": 9}},
         "required": ["kind", "lives"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
         "required": ["kind", "good"], "additionalProperties": False}]}}, "required": ["pet"],
     "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
                                      "label": {"type": "string", "minLength": 1, "maxLength": 6}},
     "required": ["score", "label"], "additionalProperties": False},
]
PROMPTS = ["Answer in JSON.", "Describe a person and their pet as JSON.", "Give me some data about a shop order."]
MAX_NEW = 64   # every schema above has a valid answer far shorter than this


@pytest.fixture(scope="module")
def llm():
    from spark_lab.llm import LLM
    return LLM.load(n_ctx=256)


def _check(llm, schema, prompt, temperature):
    g = llm.generate(prompt, max_new_tokens=MAX_NEW, temperature=temperature, json_schema=schema)
    assert g.finish_reason == "stop", (schema, g.text)
    value = json.loads(g.text)
    jsonschema.validate(value, schema)
    return g


def test_twenty_schemas():
    assert len(SCHEMAS) == 20
    for s in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(s)


@needs_model
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_schemas_subset(llm, temperature):
    for i in (0, 7, 13, 18):
        _check(llm, SCHEMAS[i], PROMPTS[i % 3], temperature)


@needs_model
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_schemas_all(llm, temperature):
    for schema in SCHEMAS:
        for prompt in PROMPTS:
            _check(llm, schema, prompt, temperature)


@needs_model
def test_greedy_is_the_best_allowed_token(llm):
    """Each constrained greedy token is the argmax of the model's logits over the allowed tokens."""
    schema = SCHEMAS[0]
    llm.reset()                  # the prompt from scratch, as below (a reused prefix rounds differently)
    g = llm.generate("Answer in JSON.", max_new_tokens=MAX_NEW, temperature=0, json_schema=schema)
    c = Constraint.build(llm.tokenizer, json_schema=schema)
    prompt = g.prompt_token_ids
    llm.reset()
    for k, tok in enumerate(g.token_ids):
        logits, _ = llm.prefill(prompt + g.token_ids[:k])
        allowed = c.mask()
        masked = np.where(allowed, logits, -np.inf)
        assert tok == int(np.argmax(masked))
        c.advance(tok)
    assert c.done


@needs_model
def test_regex_and_grammars(llm):
    g = llm.generate("Give a date.", max_new_tokens=20, temperature=0, regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
    assert g.finish_reason == "stop" and len(g.text) == 10 and g.text[4] == "-" and g.text[7] == "-"
    for grammar in ('root ::= "yes" | "no"', 'start: "yes" | "no"'):
        g = llm.generate("Is the sky blue?", max_new_tokens=10, temperature=0.8, seed=3, grammar=grammar)
        assert g.text in ("yes", "no") and g.finish_reason == "stop"
    calc = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}]
    g = llm.generate("What is 2 + 3?", max_new_tokens=40, temperature=0, json_schema=tool_call_schema(calc))
    call = json.loads(g.text)
    assert call["name"] == "add" and set(call["arguments"]) == {"a", "b"}


@needs_model
def test_streaming_pieces_join_to_the_answer(llm):
    pieces = list(llm.stream("Answer in JSON.", max_new_tokens=MAX_NEW, temperature=0, json_schema=SCHEMAS[1]))
    text = "".join(pieces)
    assert json.loads(text)["color"] in ("red", "green", "blue")


def test_sampling_mask_keeps_only_allowed():
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0], dtype=np.float32)
    allowed = np.array([False, False, True, False, True])
    assert sample(logits, SamplingParams(temperature=0), np.random.default_rng(0), allowed=allowed) == 2
    rng = np.random.default_rng(0)
    drawn = {sample(logits, SamplingParams(temperature=1.0, min_p=0.0), rng, allowed=allowed) for _ in range(200)}
    assert drawn == {2, 4}


@pytest.mark.parametrize("schema, words", [
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum (5) is greater than maximum (3)"),
    ({"type": "strin"}, "invalid JSON schema at type"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "string", "format": "uri-reference"}, "uri-reference"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable"),
    ("{not json", "not valid JSON"),
])
def test_bad_schemas_name_the_problem(schema, words):
    from spark_lab.tokenizer import Tokenizer
    from spark_lab.models import resolve
    if not is_present("smollm2-135m-instruct"):
        pytest.skip("SmolLM2 is not installed")
    tok = Tokenizer.from_gguf(resolve(None))
    with pytest.raises(GrammarError, match=None) as e:
        Constraint.build(tok, json_schema=schema)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_one_constraint_at_a_time():
    with pytest.raises(GrammarError, match="json_schema and regex"):
        Constraint.build(None, json_schema={"type": "object"}, regex="a")


ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}


@needs_model
def test_chat_session_schema_and_tools(llm):
    from spark_lab.llm import ChatSession
    s = ChatSession(llm)
    answer = s.send("Describe a person.", json_schema=SCHEMAS[0], temperature=0, max_new_tokens=MAX_NEW)
    jsonschema.validate(json.loads(answer), SCHEMAS[0])
    assert s.history[-1] == {"role": "assistant", "content": answer}
    s = ChatSession(llm, tools=[ADD])
    s.send("What is 2 + 3?", tool_choice="required", temperature=0, max_new_tokens=MAX_NEW)
    (call,) = s.last_tool_calls
    args = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "add" and set(args) == {"a", "b"}
    s.add_tool_result(call, args["a"] + args["b"])
    assert s.history[-1]["role"] == "tool" and s.history[-2]["tool_calls"] == [call]
    s.send(None, temperature=0, max_new_tokens=24)          # the model continues after the result
    assert s.history[-1]["role"] == "assistant"


@needs_model
def test_chatbox_runs_tools_and_shows_them(llm):
    pytest.importorskip("ipywidgets")
    from spark_lab.widgets import ChatBox
    seen = []

    def add(a, b):
        seen.append((a, b))
        return a + b
    box = ChatBox(llm, tools=[ADD], functions={"add": add}, max_tool_rounds=2, tool_choice="required",
                  temperature=0, max_new_tokens=MAX_NEW)
    box.send("What is 2 + 3?")
    events = box.tool_events[0]
    assert events and events[0][0] == "add" and events[0][2] == sum(seen[0])
    assert "spark-tool" in box.transcript.value and f"&rarr; {sum(seen[0])}" in box.transcript.value


@needs_model
def test_dead_ends_raise_not_hang(llm):
    c = Constraint.build(llm.tokenizer, regex="[0-9]{2}")
    allowed = c.mask()
    bad = int(np.flatnonzero(~allowed)[0])
    with pytest.raises(GrammarError, match=f"token {bad} breaks the regex"):
        c.advance(bad)
    c = Constraint.build(llm.tokenizer, regex="[0-9]{2}")
    c._pending.result()
    c.bits[:] = 0                                   # as if no token of the vocabulary could continue
    with pytest.raises(GrammarError, match="no token can continue"):
        c.mask()


@needs_model
def test_bench_reports_the_ratio():
    from spark_lab.benchmarks.constrain import run
    r = run(n_new=8, repeats=1)
    assert r["free_tps"] > 0 and r["constrained_tps"] > 0
    assert abs(r["ratio"] - r["constrained_tps"] / r["free_tps"]) < 0.01
    assert 0 < r["mask_ms_per_token"] < 50
