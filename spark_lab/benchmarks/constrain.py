"""Decode speed with a JSON Schema active vs unconstrained (the goal: >= 0.9x), same model, same prompt.

The schema asks for a long array of short strings so the constrained run decodes as many tokens as
the free one (neither stops early); runs alternate free / constrained, greedy, and the medians are
compared. Also reported: the time to compute one mask (on the helper thread, during the forward
pass) and the time decoding actually waited for it.

    spark-lab bench constrain [--repeats 3] [--threads 1] [--quick] [--json]
"""
from __future__ import annotations

import json
import statistics

PROMPT = "List the names of forty cities around the world as a JSON array."
SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 200}


def run(model=None, n_new: int = 64, repeats: int = 3) -> dict:
    from ..llm import LLM
    from ..llm.constrain import Constraint, llg_tokenizer
    llm = LLM.load(model, n_ctx=512)
    ids = llm.encode_chat([{"role": "user", "content": PROMPT}])
    llg_tokenizer(llm.tokenizer)                               # the vocabulary, once (not part of decode)
    llm.generate(ids, max_new_tokens=8, temperature=0)         # warm-up (numba compiles)
    free, constrained, mask_ms, wait_ms = [], [], [], []
    for _ in range(repeats):
        llm.reset()
        g = llm.generate(ids, max_new_tokens=n_new, temperature=0, stop_at_eos=False)
        free.append(g.tokens_per_second)
        llm.reset()
        c = Constraint.build(llm.tokenizer, json_schema=SCHEMA)
        g = llm.generate(ids, max_new_tokens=n_new, temperature=0, constraint=c)
        constrained.append(g.tokens_per_second)
        mask_ms.append(c.mask_seconds / max(1, c.steps) * 1e3)
        wait_ms.append(c.wait_seconds / max(1, c.steps) * 1e3)
    f, c = statistics.median(free), statistics.median(constrained)
    return {"model": llm.name, "new_tokens": n_new, "free_tps": round(f, 2), "constrained_tps": round(c, 2),
            "ratio": round(c / f, 3) if f else None, "mask_ms_per_token": round(statistics.median(mask_ms), 3),
            "wait_ms_per_token": round(statistics.median(wait_ms), 3), "goal": 0.9}


def main(args) -> int:
    from ..device import set_threads
    if getattr(args, "threads", None):
        set_threads(args.threads)
    quick = getattr(args, "quick", False)
    r = run(getattr(args, "model", None), n_new=32 if quick else 64, repeats=1 if quick else args.repeats)
    if getattr(args, "json", False):
        print(json.dumps(r))
        return 0
    print(f"{r['model']}: {r['new_tokens']} tokens, greedy")
    print(f"  unconstrained   {r['free_tps']:8.1f} tok/s")
    print(f"  JSON Schema     {r['constrained_tps']:8.1f} tok/s   ratio {r['ratio']:.3f} (goal >= {r['goal']})")
    print(f"  mask {r['mask_ms_per_token']:.3f} ms/token on the helper thread, decoding waited "
          f"{r['wait_ms_per_token']:.3f} ms/token")
    return 0
