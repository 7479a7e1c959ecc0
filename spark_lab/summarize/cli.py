"""`spark-lab summarize` (argument parsing lives in spark_lab/cli.py)."""
from __future__ import annotations

import json
import sys

from .readers import read_document

def cmd_summarize(args) -> int:
    """`spark-lab summarize [--model M] [--method ...] [--max-words N] [--json] FILE|-`"""
    from . import summarize
    text = read_document(args.file)
    llm = None
    if args.method in ("abstractive", "hybrid"):
        from ..llm import LLM
        llm = LLM.load(args.model) if args.model else LLM.load("smollm2-135m-instruct")
    s = summarize(text, method=args.method, max_words=args.max_words, llm=llm,
                  progress=sys.stderr.isatty())
    if getattr(args, "json", False):
        d = s.to_dict()
        if llm is not None:
            d["model"] = getattr(llm, "name", args.model)
        print(json.dumps(d, ensure_ascii=False))
    else:
        print(s.text)
    return 0
