"""Chat templates: the model's own Jinja template from `tokenizer.chat_template`, ChatML otherwise.

Rendered in jinja2's sandbox with what real templates expect besides `messages` and
`add_generation_prompt`: `raise_exception`, `strftime_now` (gpt-oss puts today's date in its system
message), `tojson` as transformers defines it (plain JSON, no HTML escaping), and any template
options the caller passes on (`enable_thinking` for Qwen3, `reasoning_effort` for gpt-oss, `tools`).

A chat template comes from a file a stranger wrote, so it runs with limits besides the sandbox's
(which already refuses `''.__class__`, `x.__globals__` and ranges over 100,000):
- time: while it renders, a line tracer (sys.settrace, this thread only, template frames only)
  checks a deadline every 256 template lines. Jinja has no timeout, and a loop in a template is a
  plain Python `for` over a finite iterable, so no sandbox hook sees its iterations (nested
  `range(100000)` loops with an empty body run 10^10 times without calling anything); tracing the
  compiled template's own lines is the one place every iteration passes. It costs ~2x on a render
  that takes a millisecond.
- size: every operation that can make a big string or list in one step is checked BEFORE it runs
  (`*`, `**`, `%`, `+`, `~`, method calls such as `center(10**9)` or `join`, filters with a numeric
  width), and the output is collected chunk by chunk from `generate()`, stopping at the limit.
"""
from __future__ import annotations

import datetime
import functools
import json
import re
import sys
import threading
import time

from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
MAX_SECONDS = 2.0             # a real chat template renders in milliseconds
MAX_CHARS = 4_000_000         # output limit besides 4x the messages' own text (a prompt beyond any context)


class TemplateError(ValueError):
    """A chat template that fails to render, or a malformed message list."""


def _raise(message):
    raise TemplateError(f"chat template: {message}")


class _Budget(threading.local):
    """This thread's render limits: a deadline and a size (None outside a render)."""
    deadline: float | None = None
    max_chars: int = MAX_CHARS
    lines: int = 0

    def check_time(self):
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TemplateError(f"chat template took longer than {MAX_SECONDS:g} s to render (a runaway loop?)")

    def check_size(self, n: int, what: str):
        if n > self.max_chars:
            raise TemplateError(f"chat template output too large: {what} would make {n:,} characters "
                                f"(limit {self.max_chars:,})")


_budget = _Budget()
_WIDTH = re.compile(r"%[-#0 +]*(\d+)|\{[^{}]*?:[^{}]*?(\d+)[^{}]*\}")


def _size(x) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else 0


def _check_args(args, kwargs, what: str):
    """A numeric argument bigger than the output limit is a width (center, ljust, indent, zfill...)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _budget.max_chars:
            raise TemplateError(f"chat template: {what} asks for a size of {a:,} (limit {_budget.max_chars:,})")


def _trace(frame, event, arg):
    if frame.f_code.co_filename != "<template>":
        return None

    def line(frame, event, arg):
        _budget.lines += 1
        if not _budget.lines & 255:
            _budget.check_time()
        return line
    return line


class _CodeGen(CodeGenerator):
    def visit_Concat(self, node, frame):            # `a ~ b`: joined through a size check
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGen
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def unsafe_undefined(self, obj, attribute):
        # jinja's sandbox renders `f.__globals__` as an empty Undefined; a template that reaches for
        # Python internals is hostile, so it stops here with a clear line instead
        raise TemplateError(f"chat template: access to {attribute!r} of a {type(obj).__name__} is not allowed (sandbox)")

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    _budget.check_size(_size(seq) * n, "'*'")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            _budget.check_size(right * abs(left).bit_length() // 3, "'**'")     # ~digits of the result
        elif operator == "+":
            _budget.check_size(_size(left) + _size(right), "'+'")
        elif operator == "%" and isinstance(left, str):
            _budget.check_size(max((int(a or b) for a, b in _WIDTH.findall(left)), default=0), "a '%' width")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):
        _budget.check_time()
        name = getattr(__obj, "__name__", "call")
        this = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)   # sandbox wraps str.format
        _check_args(args, kwargs, f"{name}()")
        if name == "join" and args and isinstance(args[0], (list, tuple)):
            _budget.check_size(sum(map(_size, args[0])) + len(args[0]) * _size(this), "join()")
        if name in ("format", "format_map") and isinstance(this, str):
            _budget.check_size(max((int(a or b) for a, b in _WIDTH.findall(this)), default=0), "a format width")
        if name == "replace" and len(args) >= 2 and isinstance(this, str):
            s, old, new = this, args[0], args[1]
            if isinstance(old, str) and isinstance(new, str):
                _budget.check_size(len(s) + (s.count(old) if old else len(s) + 1) * len(new), "replace()")
        out = super().call(__context, __obj, *args, **kwargs)
        _budget.check_size(_size(out), f"{name}()")
        return out

    @staticmethod
    def checked_concat(parts):
        parts = [str(p) for p in parts]
        _budget.check_size(sum(map(len, parts)), "'~'")
        return "".join(parts)


def _limited_filter(name, f):
    @functools.wraps(f)
    def run(*args, **kwargs):
        _budget.check_time()
        _check_args(args[1:] if getattr(f, "jinja_pass_arg", None) else args, kwargs, f"the {name} filter")
        if name == "join":
            items = [a for a in args if isinstance(a, (list, tuple))]
            if items:
                _budget.check_size(sum(map(_size, items[0])) * 2 + len(items[0]), "the join filter")
        out = f(*args, **kwargs)
        _budget.check_size(_size(out), f"the {name} filter")
        return out
    return run


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    env = _LimitedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.filters = {k: _limited_filter(k, f) for k, f in env.filters.items()}
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
        template = _compile(source)
        variables = dict(**options, messages=list(messages), add_generation_prompt=add_generation_prompt,
                         bos_token=piece(getattr(tok, "bos_id", None)), eos_token=piece(getattr(tok, "eos_id", None)))
        return _render_limited(template, variables, MAX_CHARS + 4 * sum(len(m["content"]) for m in messages))
    except TemplateError:
        raise
    except Exception as e:
        raise TemplateError(f"chat template failed to render: {type(e).__name__}: {str(e)[:200]}") from None


def _render_limited(template, variables: dict, max_chars: int) -> str:
    """template.generate() joined, under this thread's time and size budget (see the module doc)."""
    outer = _budget.deadline is not None          # a template rendered from inside a render keeps its budget
    if not outer:
        _budget.deadline, _budget.max_chars, _budget.lines = time.monotonic() + MAX_SECONDS, max_chars, 0
    previous = sys.gettrace()
    sys.settrace(_trace)
    try:
        out, n = [], 0
        for chunk in template.generate(**variables):
            n += len(chunk)
            _budget.check_size(n, "the rendered prompt")
            out.append(chunk)
        return "".join(out)
    finally:
        sys.settrace(previous)
        if not outer:
            _budget.deadline = None
