"""Reasoning output: the model's thinking split from its answer, also while it streams.

Two formats, as the model's own chat template shows them:

    think     Qwen3 (and DeepSeek-R1 style):  <think>\\n...reasoning...\\n</think>\\n\\nanswer
              `enable_thinking=False` makes Qwen3's template close an empty block in the prompt,
              and a template that opens `<think>` in the prompt makes the model start inside one.
    harmony   gpt-oss: messages on channels, the analysis channel is the reasoning, final the answer
              <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...

`reasoning_format(template)` tells which one a template speaks (None: no reasoning), and
`ReasoningSplitter(fmt, prompt_tail)` turns text pieces (tokens decoded one by one, so a marker
may arrive in several pieces) into [(kind, text)] with kind "reasoning" or "text". It holds back
only what could still become a marker; what it returns is final. Pieces of reasoning travel as
`ReasoningPiece` (a str), so code that only joins text keeps working.
"""
from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
H_START, H_CHANNEL, H_MESSAGE, H_END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
H_STOPS = ("<|return|>", "<|call|>")           # end of a harmony answer (end-of-generation tokens)
FORMATS = ("think", "harmony")


class ReasoningPiece(str):
    """A streamed piece of reasoning (a plain str otherwise)."""


def reasoning_format(template: str | None) -> str | None:
    """'harmony' | 'think' | None: the reasoning format a chat template speaks."""
    if not template:
        return None
    if H_CHANNEL in template and H_MESSAGE in template:
        return "harmony"
    if THINK_CLOSE in template:
        return "think"
    return None


def _held(buf: str, markers) -> int:
    """Length of the longest tail of buf that is the start of a marker (it may still become one)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:n]):
                best = n
                break
    return best


def _find(buf: str, markers):
    """-> (index, marker) of the first marker in buf, or (-1, None)."""
    hits = [(buf.find(m), m) for m in markers if m in buf]
    return min(hits) if hits else (-1, None)


class ReasoningSplitter:
    """Text pieces -> [(kind, text)] with kind 'reasoning' or 'text'; push() each piece, flush() at the end.

    prompt_tail: the end of the rendered prompt (a few hundred characters are plenty); it says whether
    generation starts inside a thinking block (think) or where in a harmony message it starts."""

    def __init__(self, fmt: str, prompt_tail: str = ""):
        if fmt not in FORMATS:
            raise ValueError(f"unknown reasoning format {fmt!r} (known: {', '.join(FORMATS)})")
        self.fmt = fmt
        self.buf = ""                    # text not yet classified (may hold the start of a marker)
        self.reasoning, self.text = [], []
        self.pending_nl = ""             # reasoning's trailing newlines: dropped if the block ends here
        if fmt == "think":
            opened, closed = prompt_tail.rfind(THINK_OPEN), prompt_tail.rfind(THINK_CLOSE)
            self.state = "reasoning" if opened > closed else "start"
        else:
            self.channel, self.seen = "", False     # header text so far; any marker seen yet
            tail = prompt_tail.rstrip()
            ch, msg = tail.rfind(H_CHANNEL), tail.rfind(H_MESSAGE)
            if msg > ch >= 0 and msg > tail.rfind(H_END):          # the prompt opened a message body
                self.channel, self.state = tail[ch + len(H_CHANNEL):msg], "body"
            else:
                self.state = "header"                               # <|start|>assistant: a header comes

    # ------------------------------------------------------------------ output
    def _out(self, kind: str, s: str, out: list):
        if not s:
            return
        if kind == "reasoning":
            s = self.pending_nl + s
            if not self.reasoning:
                s = s.lstrip("\n")                   # "<think>\n": the newline is layout
            body = s.rstrip("\n")                    # trailing newlines wait: dropped if the block ends
            self.pending_nl, s = s[len(body):], body
        elif not self.text:
            s = s.lstrip()                           # "</think>\n\n" before the answer is layout
        if s:
            (self.reasoning if kind == "reasoning" else self.text).append(s)
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + s)
            else:
                out.append((kind, s))

    # ------------------------------------------------------------------ think
    def _think(self, out: list, final: bool) -> None:
        while self.buf:
            if self.state == "start":                # only leading whitespace may come before <think>
                s = self.buf.lstrip()
                if not s:
                    return
                if s.startswith(THINK_OPEN):
                    self.buf, self.state = s[len(THINK_OPEN):], "reasoning"
                    continue
                if THINK_OPEN.startswith(s) and not final:
                    return
                self.state = "text"
            if self.state == "reasoning":
                i, _ = _find(self.buf, (THINK_CLOSE,))
                if i >= 0:
                    self._out("reasoning", self.buf[:i], out)
                    self.pending_nl = ""
                    self.buf, self.state = self.buf[i + len(THINK_CLOSE):], "text"
                    continue
                keep = 0 if final else _held(self.buf, (THINK_CLOSE,))
                self._out("reasoning", self.buf[:len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep:]
                return
            self._out("text", self.buf, out)         # after the block: everything is the answer
            self.buf = ""

    # ------------------------------------------------------------------ harmony
    def _harmony(self, out: list, final: bool) -> None:
        markers = (H_START, H_CHANNEL, H_MESSAGE, H_END) + H_STOPS
        while self.buf:
            i, m = _find(self.buf, markers)
            if i < 0:
                keep = 0 if final else _held(self.buf, markers)
                head, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                self._harmony_text(head, out)
                break
            self._harmony_text(self.buf[:i], out)
            self.buf, self.seen = self.buf[i + len(m):], True
            if m == H_MESSAGE:
                self.state = "body"
                if self.reasoning and not self.channel.startswith("final"):
                    self.pending_nl = "\n"          # a second analysis message: a line between them
            elif m == H_CHANNEL:
                self.state, self.channel = "header", ""
            elif m == H_START:
                self.state, self.channel = "role", ""
            else:                                    # <|end|>, <|return|>, <|call|>: the message ends
                self.state = "between"
                self.pending_nl = ""
        if final and self.state == "header" and not self.seen:   # no harmony markers at all: plain text
            self._out("text", self.channel, out)

    def _harmony_text(self, s: str, out: list) -> None:
        if not s:
            return
        if self.state == "header":
            self.channel += s                        # "analysis", "final", "commentary to=functions.f json"
        elif self.state == "body":
            name = self.channel.split()[0] if self.channel.strip() else ""
            self._out("text" if name == "final" else "reasoning", s, out)
        # role ("assistant") and text between messages are structure, not output

    # ------------------------------------------------------------------ API
    def push(self, piece: str) -> list[tuple[str, str]]:
        self.buf += piece
        out: list = []
        (self._think if self.fmt == "think" else self._harmony)(out, final=False)
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list = []
        (self._think if self.fmt == "think" else self._harmony)(out, final=True)
        self.buf = ""
        return out

    @property
    def result(self) -> tuple[str, str]:
        """(reasoning, text) of everything pushed so far."""
        return "".join(self.reasoning), "".join(self.text)


def split_reasoning(text: str, fmt: str | None, prompt_tail: str = "") -> tuple[str, str]:
    """Whole generated text -> (reasoning, answer); fmt None: ("", text)."""
    if fmt is None:
        return "", text
    s = ReasoningSplitter(fmt, prompt_tail)
    s.push(text)
    s.flush()
    return s.result
