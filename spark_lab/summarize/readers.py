"""Documents in: .txt, .md, .html and .pdf files or stdin -> plain text with paragraphs."""
from __future__ import annotations

import html.parser
import re
import sys
from pathlib import Path

class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page; block elements become paragraph breaks."""
    BLOCK = {"p", "div", "br", "li", "tr", "section", "article", "header", "footer", "blockquote",
             "pre", "table", "ul", "ol", "dd", "dt", "figcaption", "main", "aside", "hr"}
    SKIP = {"script", "style", "noscript", "template", "head", "svg", "nav"}  # not prose

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n# ")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK or re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        t = "".join(self.parts)
        t = re.sub(r"[ \t]*\n[ \t]*", "\n", t)
        t = re.sub(r"\n{3,}", "\n\n", t)
        t = re.sub(r"\n# \n", "\n", t)
        return t.strip()


_UNCLOSED = re.compile(r"<(?!!--)(?=[^<>]*(?:<|$))")


def html_to_text(html_text: str) -> str:
    # a '<' with no '>' before the next '<' is text, not a tag; escaped first because html.parser
    # rescans from every such '<' (quadratic: 40 KB of "<p<p<p..." took 5 s)
    text = _UNCLOSED.sub("&lt;", html_text)
    try:
        return _parse_html(text)
    except AssertionError:
        # html.parser asserts on some malformed declarations ('<![-->'); read every '<!' that
        # does not open a comment as text and parse again
        return _parse_html(re.sub(r"<!(?!--)", "&lt;!", text))


def _parse_html(text: str) -> str:
    p = _HTMLText()
    p.feed(text)
    p.close()
    return p.text()


def markdown_to_text(md: str) -> str:
    """Light Markdown cleanup: keep headings and list items as lines, drop markup."""
    out, fence = [], False
    for line in md.splitlines():
        if line.strip().startswith(("```", "~~~")):
            fence = not fence
            out.append("")
            continue
        if fence:
            continue  # code is not prose
        # brackets excluded inside the spans, so an unclosed "[a](" repeated is read in linear time
        line = re.sub(r"!\[[^\][]*\]\([^()]*\)", "", line)          # images
        line = re.sub(r"\[([^\][]+)\]\([^()]*\)", r"\1", line)       # links -> their text
        line = re.sub(r"(\*\*|__|`)", "", line)                     # bold, code spans
        line = re.sub(r"(?<!\w)[*_](\S[^*_]*?)[*_](?!\w)", r"\1", line)  # emphasis
        line = re.sub(r"^\s{0,3}>\s?", "", line)                    # block quotes
        out.append(line)
    return "\n".join(out)


def decode_bytes(data: bytes, name: str = "input") -> str:
    if not data.strip():
        raise ValueError(f"{name} is empty")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            pass
        else:
            if not text.strip():
                raise ValueError(f"{name} is empty")
            return text
    if b"\x00" in data[:8192]:
        raise ValueError(f"{name} looks like a binary file (it contains NUL bytes), not text")
    for enc in ("utf-8", "utf-8-sig"):
        try:
            text = data.decode(enc).lstrip("\ufeff")
        except UnicodeDecodeError as e:
            err = e
            continue
        if not text.strip():
            raise ValueError(f"{name} is empty")
        return text
    raise ValueError(f"{name} is not UTF-8 text (undecodable byte at offset {err.start}); "
                     f"convert it first, e.g. `iconv -f latin1 -t utf-8`")


def pdf_to_text(data: bytes, name: str = "input") -> str:
    """A PDF's text layer (pypdf), pages separated by blank lines; lines of a page that run on
    (no end mark) are joined, so hard-wrapped prose reads as paragraphs."""
    if not data.strip():
        raise ValueError(f"{name} is empty")
    try:
        import pypdf
    except ImportError:
        raise ImportError("PDF input needs pypdf: pip install pypdf") from None
    import io
    import logging
    logging.getLogger("pypdf").setLevel(logging.ERROR)   # malformed files: our one line, not pypdf's warnings
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise ValueError(f"{name} is an encrypted PDF; decrypt it first (e.g. `qpdf --decrypt`)")
        pages = [pg.extract_text() or "" for pg in reader.pages]
    except ValueError:
        raise
    except Exception as e:   # pypdf raises many kinds on a broken file
        raise ValueError(f"{name} is not a readable PDF ({type(e).__name__}: {e})") from None
    out = []
    for page in pages:
        paras, cur = [], []
        for line in page.splitlines():
            if not line.strip():
                if cur:
                    paras.append(" ".join(cur))
                    cur = []
                continue
            cur.append(line.strip())
            if re.search(r"[.!?:]['\")]?$", line.strip()) and len(line.strip()) < 60:
                paras.append(" ".join(cur))   # a short line ending a sentence ends its paragraph
                cur = []
        if cur:
            paras.append(" ".join(cur))
        out.append("\n\n".join(paras))
    text = "\n\n".join(t for t in out if t.strip())
    if not text.strip():
        raise ValueError(f"{name} has no text layer (a scanned PDF? run OCR first, e.g. `ocrmypdf`)")
    return text


def read_document(path: str | Path) -> str:
    """`.txt`, `.md`, `.html`/`.htm`, `.pdf` file, or `-` for stdin -> plain text with paragraphs."""
    if str(path) == "-":
        raw, name, suffix = sys.stdin.buffer.read(), "stdin", ""
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no such file: {p}")
        if p.is_dir():
            raise ValueError(f"{p} is a folder, not a document")
        raw, name, suffix = p.read_bytes(), str(p), p.suffix.lower()
    if suffix == ".pdf" or raw[:5] == b"%PDF-":
        return pdf_to_text(raw, name)
    text = decode_bytes(raw, name)
    looks_html = suffix in (".html", ".htm", ".xhtml") or (
        suffix == "" and re.match(r"\s*(<!doctype html|<html|<body|<p>)", text[:200], re.I))
    if looks_html:
        text = html_to_text(text)
    elif suffix in (".md", ".markdown"):
        text = markdown_to_text(text)
    if not text.strip():
        raise ValueError(f"{name} has no text to summarize")
    return text
