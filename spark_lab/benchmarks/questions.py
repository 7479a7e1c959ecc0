"""Demo questions: how often the default model, with the default sampling, answers a fixed set of
simple questions with the expected fact (and without looping).

    spark-lab bench questions [--model M] [--repeats N] [--json]

The set lives in tests/data/demo_questions.json: each question lists accepted answer keywords
(any one must appear, as a whole word, case-insensitive) and optionally rejected ones (a wrong fact
the model likes, such as "Caravaggio" for the Mona Lisa). An answer also fails when a 4-word phrase
occurs more than twice in it (a loop). Each question is asked once per seed 0..N-1 with the demo
system prompt; the rate is answers passed / answers asked. The notebooks ask questions from this set.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from ..llm.repetition import has_loop

# a short system prompt makes SmolLM2-135M answer in one sentence instead of wandering off
DEMO_SYSTEM = "You are a helpful assistant. Answer in one short, factual sentence."
MAX_NEW_TOKENS = 48


def questions_path() -> Path:
    env = os.environ.get("SPARK_LAB_QUESTIONS")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "tests" / "data" / "demo_questions.json"
    if not p.is_file():
        raise FileNotFoundError(f"no demo questions at {p} (set SPARK_LAB_QUESTIONS to the file)")
    return p


def load_questions(path: Path | None = None) -> list[dict]:
    qs = json.loads(Path(path or questions_path()).read_text())
    for q in qs:
        if not q.get("question") or not q.get("accept"):
            raise ValueError(f"a demo question needs 'question' and 'accept': {q}")
    return qs


def _mentions(text: str, keyword: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(keyword)}(?!\w)", text, re.I) is not None


def passes(answer: str, q: dict) -> bool:
    """The answer names an accepted fact, no rejected one, and does not loop."""
    return (any(_mentions(answer, k) for k in q["accept"])
            and not any(_mentions(answer, k) for k in q.get("reject", []))
            and not has_loop(answer, n=4, k=2))


def demo_messages(question: str, system: str | None = DEMO_SYSTEM) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def evaluate(llm, questions: list[dict], seeds=(0,), system: str | None = DEMO_SYSTEM,
             max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False, **sampling) -> list[dict]:
    """-> one row per (question, seed): question, seed, answer, passed. Default sampling unless
    `sampling` says otherwise (e.g. temperature=0 for greedy)."""
    rows = []
    for q in questions:
        for seed in seeds:
            g = llm.chat(demo_messages(q["question"], system), max_new_tokens=max_new_tokens,
                         **{"seed": seed, **sampling})
            rows.append({"question": q["question"], "seed": seed, "answer": g.text, "passed": passes(g.text, q)})
            if progress:
                print(f"{'ok  ' if rows[-1]['passed'] else 'FAIL'} [{seed}] {q['question']} -> "
                      f"{' '.join(g.text.split())[:100]}", file=sys.stderr)
    return rows


def pass_rate(rows: list[dict]) -> float:
    return sum(r["passed"] for r in rows) / max(len(rows), 1)


def main(args) -> int:
    from ..device import set_threads
    from ..llm import LLM
    set_threads(getattr(args, "threads", None))
    llm = LLM.load(getattr(args, "model", None) or "smollm2-135m-instruct", n_ctx=1024)
    qs = load_questions()
    seeds = tuple(range(getattr(args, "repeats", 1) or 1))
    rows = evaluate(llm, qs, seeds, progress=not getattr(args, "json", False))
    per_seed = {s: pass_rate([r for r in rows if r["seed"] == s]) for s in seeds}
    if getattr(args, "json", False):
        print(json.dumps({"model": llm.name, "pass_rate": pass_rate(rows), "per_seed": per_seed,
                          "rows": rows}, ensure_ascii=False))
    else:
        n = sum(r["passed"] for r in rows)
        print(f"{llm.name}, default sampling, system prompt {DEMO_SYSTEM!r}: {n}/{len(rows)} answers "
              f"pass ({pass_rate(rows):.0%}); per seed: "
              + ", ".join(f"{s}: {v:.0%}" for s, v in per_seed.items()))
    return 0
