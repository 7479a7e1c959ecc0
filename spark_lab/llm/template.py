"""Chat templates: the model's own Jinja template from `tokenizer.chat_template`, ChatML otherwise.

Rendered in jinja2's sandbox with what real templates expect besides `messages` and
`add_generation_prompt`: `raise_exception`, `strftime_now` (gpt-oss puts today's date in its system
message), `tojson` as transformers defines it (plain JSON, no HTML escaping), and any template
options the caller passes on (`enable_thinking` for Qwen3, `reasoning_effort` for gpt-oss, `tools`).
"""
from __future__ import annotations

import datetime
import functools
import json

from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


class TemplateError(ValueError):
    """A chat template that fails to render, or a malformed message list."""


def _raise(message):
    raise TemplateError(f"chat template: {message}")


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TemplateError(f"message {i} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TemplateError(f"message {i} has unknown role {m['role']!r} (use one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise TemplateError(f"message {i} content must be a string")


def render_chat(tokenizer, messages, add_generation_prompt: bool = True, **options) -> str:
    """messages -> the prompt text; options go to the template as variables (enable_thinking=False,
    reasoning_effort="high", tools=[...]); a template ignores the ones it does not know."""
    check_messages(messages)
    source = getattr(tokenizer, "chat_template", None) or CHATML
    tok = tokenizer

    def piece(i):
        return tok.decode([i], skip_special=False) if i is not None and i >= 0 else ""

    try:
        return _compile(source).render(
            **options, messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=piece(getattr(tok, "bos_id", None)), eos_token=piece(getattr(tok, "eos_id", None)))
    except TemplateError:
        raise
    except Exception as e:
        raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from None
