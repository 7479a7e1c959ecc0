"""The summarizer's readers on random bytes and markup: text or one ValueError line, in linear time."""
from __future__ import annotations

import time

import pytest
from hypothesis import given, strategies as st

from spark_lab.summarize.readers import decode_bytes, html_to_text, markdown_to_text, read_document

from .budget import budget, case_dir

MARKUP = st.lists(st.sampled_from(["<p>", "</p>", "<script>", "</script>", "<style>", "<br>", "<!--", "-->",
                                   "<![CDATA[", "]]>", "&amp;", "&#0;", "&#x110000;", "&#99999999999;", "<a href='",
                                   "'>", "<", ">", "*", "_", "**", "`", "```", "[", "](", ")", "![", "#", "> ",
                                   "\n", "\r\n", " ", "word", "é", "\x00", "\ufeff"]) | st.text(max_size=5),
                  max_size=40).map("".join)


@budget(1000)
@given(st.binary(max_size=200) | MARKUP.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_decode_bytes(raw):
    try:
        out = decode_bytes(raw, "x.txt")
    except ValueError as e:
        assert str(e).startswith("x.txt ") and "\n" not in str(e)
        return
    assert isinstance(out, str) and out.strip()


@budget(1000)
@given(MARKUP)
def test_html_and_markdown(text):
    assert isinstance(html_to_text(text), str)
    assert isinstance(markdown_to_text(text), str)


@pytest.mark.parametrize("unit", ["*a ", "_", "<p", "<a href='x'>", "[a](", "![", "```\n", "&#", "**a*"])
def test_no_quadratic_blowup(unit):
    """A long run of one markup piece with no closer (20,000 of them) reads in well under a second;
    before the fix "<p", "[a](" and "![" took 5, 3 and 13 s (quadratic)."""
    big = unit * 20_000
    t0 = time.process_time()   # CPU seconds, not wall: robust to a loaded machine
    html_to_text(big), markdown_to_text(big)
    assert time.process_time() - t0 < 1.0


@budget(300)
@given(raw=st.binary(max_size=120) | MARKUP.map(lambda s: s.encode("utf-8", "surrogatepass")),
       suffix=st.sampled_from([".txt", ".md", ".html", ".htm", "", ".pdf", ".markdown"]))
def test_read_document(tmp_path_factory, raw, suffix):
    p = case_dir(tmp_path_factory) / f"doc{suffix}"
    p.write_bytes(raw)
    try:
        assert read_document(p).strip()
    except ValueError as e:
        assert "\n" not in str(e)
