"""Chat templates from strangers: the sandbox refuses Python internals, and runaway loops or outputs
stop at the time and size limits with one TemplateError line, fast."""
from __future__ import annotations

import time

import pytest
from hypothesis import given, strategies as st

from spark_lab.llm import template
from spark_lab.llm.template import CHATML, TemplateError, render_chat

from .budget import budget


class Tok:
    def __init__(self, source):
        self.chat_template, self.bos_id, self.eos_id = source, 0, 1

    def decode(self, ids, skip_special=False):
        return {0: "<s>", 1: "</s>"}[ids[0]]


HI = [{"role": "user", "content": "hi"}]

HOSTILE = {
    "mro": ("{{ ''.__class__.__mro__ }}", "'__class__' of a str is not allowed"),
    "globals": ("{{ cycler.__init__.__globals__ }}", "'__init__' of a type is not allowed"),
    "subclasses": ("{{ ().__class__.__base__.__subclasses__() }}", "not allowed"),
    "raise_exception globals": ("{{ raise_exception.__globals__ }}", "'__globals__' of a function is not allowed"),
    "messages append": ("{{ messages.append(1) }}", "'append' of a list is not allowed"),
    "range": ("{{ range(10**9)|list|length }}", "asks for a size of 1,000,000,000"),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "longer than"),
    "string times": ("{{ 'x' * 10**9 }}", "'\\*' would make 1,000,000,000"),
    "list times": ("{{ ['x'] * 10**9 }}", "'\\*' would make"),
    "doubling ~": ("{% set ns = namespace(x='x') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}"
                   "{% endfor %}", "'~' would make"),
    "doubling +": ("{% set ns = namespace(x='x') %}{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}"
                   "{% endfor %}", "'\\+' would make"),
    "center filter": ("{{ 'x'|center(10**9) }}", "center filter asks for"),
    "center method": ("{{ 'x'.center(10**9) }}", "center\\(\\) asks for"),
    "% width": ("{{ '%1000000000d' % 1 }}", "'%' width"),
    "format width": ("{{ '{:1000000000}'.format(1) }}", "format width"),
    "join": ("{{ (['y' * 1000000] * 1000)|join }}", "join filter would make"),
    "replace": ("{{ ('y' * 1000000).replace('y', 'yyyyyyyy') }}", "replace\\(\\) would make"),
    "many chunks": ("{% for i in range(100000) %}{{ 'abcdefghij' * 100 }}{% endfor %}", "rendered prompt"),
    "power": ("{{ 2 ** (10 ** 9) }}", "'\\*\\*' would make"),
    "recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template(name, monkeypatch):
    source, match = HOSTILE[name]
    if match == "longer than":          # the time limit itself; the others must hit their own limit first,
        monkeypatch.setattr(template, "MAX_SECONDS", 0.3)   # even on a loaded machine (the default 2 s)
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match=match) as e:
        render_chat(Tok(source), HI)
    assert time.perf_counter() - t0 < template.MAX_SECONDS + 2.0
    assert "\n" not in str(e.value)


def test_limits_reset_between_renders(monkeypatch):
    monkeypatch.setattr(template, "MAX_SECONDS", 0.3)
    with pytest.raises(TemplateError):
        render_chat(Tok(HOSTILE["nested loops"][0]), HI)
    assert render_chat(Tok(CHATML), HI) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_long_conversation_is_not_limited():
    """The size limit grows with the messages: a 2-million-character document still renders."""
    doc = "word " * 400_000
    out = render_chat(Tok(CHATML), [{"role": "user", "content": doc}] * 3)
    assert len(out) == 3 * len(doc) + 3 * len("<|im_start|>user\n<|im_end|>\n") + len("<|im_start|>assistant\n")


TEMPLATE_BITS = st.sampled_from([
    "{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.role }}{% endfor %}", "{{ bos_token }}",
    "{% if add_generation_prompt %}A:{% endif %}", "{{ x.y.z }}", "{{ messages|tojson }}", "{% set a = 1 %}",
    "{{ raise_exception('no') }}", "{{ 1/0 }}", "{{ messages[99] }}", "{{ '%s' % 3 }}", "{{ loop }}",
    "{{ strftime_now('%Y') }}", "{{ [1,2]|map('upper')|list }}", "{% for", "{{", "}}", "{% endif %}",
    "{{ ''.join }}", "{{ range(5)|sum }}", "{{ 'a' * 3 }}", "{{ messages|selectattr('role')|list }}",
    "{{ self }}", "{{ lipsum(3) }}", "{{ dict(a=1).items() }}", "{{ namespace(a=1) }}",
])


@budget(1000)
@given(st.lists(TEMPLATE_BITS | st.text(max_size=6), max_size=6),
       st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                        "content": st.text(max_size=20)}), min_size=0, max_size=3))
def test_random_templates(bits, messages):
    try:
        out = render_chat(Tok("".join(bits)), messages)
    except TemplateError as e:
        assert str(e).startswith(("chat template", "message")) and "\n" not in str(e)[:300], str(e)
        return
    assert isinstance(out, str)


@budget(1000)
@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                       "content": st.text()}), min_size=1, max_size=4))
def test_chatml_keeps_every_message(messages):
    out = render_chat(Tok(CHATML), messages)
    assert out == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"
