"""Function calling: tools into the prompt (each model's own format), tool calls out of the answer.

Three formats, read from the chat template:

  qwen     Qwen3 (and Hermes-style templates): the template lists `tools` in the system message;
           the model answers <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
  harmony  gpt-oss: the template writes a TypeScript-like `functions` namespace; the model answers
           <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>
  json     templates without tools (SmolLM2): the tools go into the system prompt (TOOL_PROMPT, below)
           and the model answers with one JSON object {"name": ..., "arguments": {...}}

tool_choice "required" or a named function constrains the answer to a valid call (llm/constrain.py):
a JSON Schema of the call for `json`, a Lark grammar around it for `qwen` and for `harmony` (whose
markers are control tokens: the grammar names them, <|channel|>, so no text can spell them).
"""
from __future__ import annotations

import json
import re
import uuid

TOOL_PROMPT = (
    "You can call these tools:\n{tools}\n"
    "To call a tool, answer with only one JSON object: "
    '{{"name": "<tool name>", "arguments": {{<arguments>}}}}. '
    "Tool results come back in messages from the role 'tool'. Otherwise answer normally."
)


def tool_format(chat_template: str | None) -> str:
    t = chat_template or ""
    if "<|channel|>" in t and "functions" in t:
        return "harmony"
    if "<tool_call>" in t:
        return "qwen"
    return "json"


def functions(tools: list[dict]) -> list[dict]:
    """OpenAI `tools` ([{"type": "function", "function": {...}}]) -> the function dicts (checked)."""
    out = []
    for i, t in enumerate(tools or []):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ValueError(f"tools.{i}: expected {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        out.append(f)
    return out


def _args_as_dict(call: dict) -> dict:
    f = dict(call.get("function", call))
    if isinstance(f.get("arguments"), str):
        try:
            f["arguments"] = json.loads(f["arguments"])
        except ValueError:
            pass
    return {**call, "function": f} if "function" in call else f


def raw_text(llm, gen) -> str:
    """The text to look for calls in: harmony's calls sit on the commentary channel, which the reasoning
    splitter files as reasoning, so for it the generated tokens are decoded again, markers and all."""
    if tool_format(llm.tokenizer.chat_template) == "harmony":
        return llm.tokenizer.decode(gen.token_ids)
    return gen.text


def _call_text(call: dict) -> str:
    f = call.get("function", call)
    args = f.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return json.dumps({"name": f["name"], "arguments": args}, ensure_ascii=False)


def prepare(messages: list[dict], tools: list[dict] | None, fmt: str) -> tuple[list[dict], dict]:
    """-> (messages for the template, template options). Assistant turns with tool_calls and tool
    results are kept for templates that know them; for `json` they become plain text turns."""
    msgs = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if fmt == "json" and m.get("tool_calls"):
            m["content"] = "\n".join(_call_text(c) for c in m.pop("tool_calls"))
        elif m.get("tool_calls"):                  # templates read arguments as a mapping (transformers' convention)
            m["tool_calls"] = [_args_as_dict(c) for c in m["tool_calls"]]
        msgs.append(m)
    if not tools:
        return msgs, {}
    if fmt != "json":   # gpt-oss's template reads every function's description: an empty one when absent
        return msgs, {"tools": [{"type": "function", "function": {"description": "", **f}} for f in functions(tools)]}
    listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions(tools))
    prompt = TOOL_PROMPT.format(tools=listing)
    if msgs and msgs[0]["role"] == "system":
        msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + prompt}
    else:
        msgs.insert(0, {"role": "system", "content": prompt})
    return msgs, {}


def constraint_args(tools: list[dict], fmt: str, name: str | None = None) -> dict:
    """-> generate() keyword arguments that force one valid call (to `name` if given)."""
    from .constrain import _bound_numbers, tool_call_schema
    schema = tool_call_schema(tools, name)
    if fmt == "json":
        return {"json_schema": schema}

    def inline(s):   # a schema inside a Lark grammar: compact, numbers bounded as for json_schema=
        return json.dumps({**_bound_numbers(s), "x-guidance": {"whitespace_flexible": False}})
    if fmt == "qwen":
        return {"grammar": 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + inline(schema)}
    # harmony: <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{args}, then <|call|> (end of turn)
    rules, alts = [], []
    for k, f in enumerate(functions(tools)):
        if name is not None and f["name"] != name:
            continue
        params = f.get("parameters") or {"type": "object", "properties": {}}
        alts.append(f"call{k}")
        rules.append(f'call{k}: <|channel|> "commentary to=functions.{f["name"]} " <|constrain|> "json" <|message|> '
                     f'%json {inline(params)}')
    return {"grammar": "start: " + " | ".join(alts) + "\n" + "\n".join(rules)}


_QWEN = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_HARMONY = re.compile(r"to=functions\.([\w.\-]+)[^<]*(?:<\|constrain\|>\w*)?<\|message\|>(.*?)(?:<\|call\|>|$)", re.S)


def parse(text: str, fmt: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
    """Answer text -> (content left over, tool calls in OpenAI's shape: id, type, function.name,
    function.arguments as a JSON string). Text that is not a well-formed call to a known tool stays content."""
    names = {f["name"] for f in functions(tools or [])}
    calls, content = [], text
    if fmt == "harmony":
        for name, args in _HARMONY.findall(text):
            calls.append(_call(name, args.strip()))
        if calls:
            content = ""
    else:
        found = _QWEN.findall(text)
        spans = found if found else [text.strip()]
        for raw in spans:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), (dict, str)):
                args = obj.get("arguments", {})
                calls.append(_call(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
        if calls:
            content = _QWEN.sub("", text).strip() if found else ""
    return content, calls


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}
