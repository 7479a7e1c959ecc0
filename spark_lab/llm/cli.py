"""`spark-lab generate` and `spark-lab chat` (argument parsing lives in spark_lab/cli.py)."""
from __future__ import annotations

import json
import sys

from .engine import LLM
from .reasoning import ReasoningPiece
from .sampling import SamplingParams

DIM, RESET = "\x1b[2m", "\x1b[0m"


class PieceWriter:
    """Writes streamed pieces; reasoning dimmed on a terminal, set off by 'thinking:' lines otherwise."""

    def __init__(self, out, tty: bool | None = None):
        self.out, self.tty = out, out.isatty() if tty is None else tty
        self.thinking = False

    def write(self, piece: str) -> None:
        reasoning = isinstance(piece, ReasoningPiece)
        if reasoning and not self.thinking:
            self.out.write(DIM if self.tty else "[thinking] ")
        elif self.thinking and not reasoning:
            self.out.write(RESET + "\n\n" if self.tty else "\n[answer] ")
        self.thinking = reasoning
        self.out.write(piece)
        self.out.flush()

    def close(self) -> None:
        if self.thinking and self.tty:
            self.out.write(RESET)
        self.thinking = False


def _read_schema(path: str):
    """--json-schema FILE -> the schema (dict); one clear line when the file is missing or not JSON."""
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--json-schema: no such file {path!r}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"--json-schema: {path} is not JSON: {e}") from None


def _read_prompt(p: str) -> str:
    text = sys.stdin.read() if p == "-" else p
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text


_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
          "repetition_penalty": "--repetition-penalty", "seed": "--seed"}


def _sampling(args) -> dict:
    """The sampling flags given on the command line, checked now (before any model loads or any
    message is typed): a bad one is one line naming the flag."""
    chosen = {k: getattr(args, k) for k in _FLAGS if getattr(args, k, None) is not None}
    if chosen.get("seed") == -1:
        chosen["seed"] = None                       # a fresh seed
    elif chosen.get("seed", 0) < 0:
        raise ValueError(f"--seed must be >= 0 (or -1 for a random one), got {chosen['seed']}")
    try:
        SamplingParams(**chosen)
    except ValueError as e:
        msg = str(e)
        for k, flag in _FLAGS.items():
            if msg.startswith(k + " "):
                msg = flag + msg[len(k):]
        raise ValueError(msg) from None
    return chosen


def _max_new_tokens(args) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return args.max_new_tokens


def cmd_generate(args) -> int:
    _max_new_tokens(args)
    sampling = _sampling(args)
    prompt = _read_prompt(args.prompt)
    if getattr(args, "json_schema", None):
        sampling["json_schema"] = _read_schema(args.json_schema)
    llm = LLM.load(args.model, n_ctx=args.context)
    if args.raw:
        ids = llm.tokenizer.encode(prompt, add_bos=None, parse_special=True)
    else:
        ids = llm.encode_chat([{"role": "user", "content": prompt}])
    it = llm.stream_tokens(ids, args.max_new_tokens, reasoning=not args.raw, **sampling)
    writer = PieceWriter(sys.stdout)
    while True:
        try:
            _, piece = next(it)
        except StopIteration as done:
            g = done.value
            break
        if not args.json and piece:
            writer.write(piece)
    writer.close()
    if args.json:
        print(json.dumps({
            "model": llm.name, "prompt_token_ids": g.prompt_token_ids, "token_ids": g.token_ids,
            "text": g.text, "reasoning": g.reasoning, "finish_reason": g.finish_reason,
            "prompt_tokens": len(g.prompt_token_ids), "completion_tokens": len(g.token_ids),
            "prompt_tokens_per_second": round(g.prompt_tokens_per_second, 2),
            "tokens_per_second": round(g.tokens_per_second, 2),
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{len(g.prompt_token_ids)} prompt tokens at {g.prompt_tokens_per_second:.1f} tok/s, "
              f"{len(g.token_ids)} generated at {g.tokens_per_second:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession
    _max_new_tokens(args)
    sampling = _sampling(args)
    llm = LLM.load(args.model)
    session = ChatSession(llm, system_prompt=args.system)
    print(f"spark-lab chat with {llm.name} ({llm.config.arch}, context {llm.n_ctx}). "
          "Empty line or Ctrl-D to quit, /reset to forget the conversation"
          + (", /think on|off to switch thinking." if llm.reasoning_format == "think" else "."), file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not user.strip():
            return 0
        if user.strip() == "/reset":
            session.reset()
            continue
        if user.strip() in ("/think on", "/think off"):     # Qwen3's switch (enable_thinking in its template)
            session.template_options["enable_thinking"] = user.strip() == "/think on"
            continue
        sys.stdout.write("bot> ")
        writer = PieceWriter(sys.stdout)                 # reasoning models: the thinking dimmed
        for piece in session.stream(user, max_new_tokens=args.max_new_tokens, **sampling):
            writer.write(piece)
        writer.close()
        g = session.last
        sys.stdout.write("\n")
        print(f"[{g.tokens_per_second:.1f} tok/s]", file=sys.stderr)
