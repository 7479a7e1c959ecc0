"""Constrained decoding: JSON Schema, plain JSON, regex or a Lark/GBNF grammar -> a token mask per step.

A thin adapter over llguidance (a Earley parser + lexer over the model's own vocabulary, written in
Rust): the grammar is compiled once (a millisecond or two for a JSON Schema), then each step asks
which of the vocabulary's tokens may come next, as a bitmask (one bit per token id).

    c = Constraint.build(llm.tokenizer, json_schema={"type": "object", ...})
    allowed = c.mask()           # bool [vocab]: tokens that keep the output inside the grammar
    c.advance(token)             # the sampled token; starts computing the next mask in a thread

The next mask is computed on a helper thread while the model runs its forward pass (llguidance
drops the GIL while it works), so decoding waits on the mask only when the mask is slower than the
forward pass. End of generation: once the grammar is complete the end-of-turn tokens are allowed
(and, when nothing else may follow, the only tokens allowed); a grammar that no token can continue
raises GrammarError instead of looping.

Why llguidance (measured on SmolLM2's 49,152-token byte-level BPE, one CPU core; see the commit):
no torch dependency (xgrammar needs torch), schema compile ~2 ms (xgrammar ~25 ms, outlines-core
~380 ms), ~0.1 ms per mask, Lark and GBNF grammars (outlines-core has regex/JSON only), and clear
errors for schema keywords it does not support.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class GrammarError(ValueError):
    """An invalid or unsupported schema/grammar, or output that no token can continue."""


def _llg():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:  # pragma: no cover - a declared dependency
        raise GrammarError("constrained decoding needs the 'llguidance' package (pip install llguidance)") from None
    return llguidance


_TOKENIZERS: dict = {}            # id(spark_lab Tokenizer) -> (tokenizer, LLTokenizer)
_TOK_LOCK = threading.Lock()


def llg_tokenizer(tokenizer):
    """spark_lab Tokenizer -> llguidance.LLTokenizer (built once per tokenizer: ~0.5 s for 49k tokens).

    Every token is handed over as the bytes it stands for (Tokenizer.token_bytes); control tokens
    (<|im_end|>) get llguidance's 0xFF prefix so no text can spell them; the end-of-turn set is eos."""
    with _TOK_LOCK:
        hit = _TOKENIZERS.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        llg = _llg()
        special = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        sset = set(special)
        tokens = [(b"\xff" + tokenizer.token_bytes(i)) if i in sset else tokenizer.token_bytes(i)
                  for i in range(tokenizer.vocab_size)]
        eos = sorted(tokenizer.eot_ids) or [tokenizer.eos_id]

        class _Wrap:
            eos_token_id = eos[0]
            bos_token_id = tokenizer.bos_id
            special_token_ids = special

            def __call__(self, s):
                text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
                return tokenizer.encode(text, add_bos=False)
        _Wrap.tokens = tokens
        lt = llg.LLTokenizer(llg.TokenizerWrapper(_Wrap()), n_vocab=tokenizer.vocab_size, eos_token=eos)
        _TOKENIZERS[id(tokenizer)] = (tokenizer, lt)
        return lt


def grammar_text(json_schema=None, grammar: str | None = None, regex: str | None = None,
                 json_object: bool = False) -> str:
    """One constraint -> llguidance's grammar string. json_schema: dict or JSON text; grammar: Lark or
    GBNF (llama.cpp's format, recognised by its `::=`); regex: Rust regex syntax; json_object: any JSON object."""
    llg = _llg()
    given = [k for k, v in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex),
                            ("json_object", json_object)) if v not in (None, False)]
    if len(given) > 1:
        raise GrammarError(f"give one constraint, not {' and '.join(given)}")
    if json_object:
        json_schema = {"type": "object"}
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(json_schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object, got {type(json_schema).__name__}")
        _check_schema(json_schema)
        # compact output: no free whitespace between tokens (a small model fills it with newlines)
        return llg.LLMatcher.grammar_from_json_schema(
            _bound_numbers(json_schema), defaults={"whitespace_flexible": False, "coerce_one_of": True})
    if regex is not None:
        return llg.LLMatcher.grammar_from_regex(regex)
    if grammar is not None:
        from llguidance._grammar_from import grammar_from
        try:
            return grammar_from("gbnf" if "::=" in grammar else "lark", grammar)
        except ValueError as e:
            raise GrammarError(f"the grammar could not be read: {e}") from None
    raise GrammarError("no constraint given (json_schema, grammar or regex)")


NUMBER_LIMIT = 1e15          # |numbers| the grammar lets a model write when the schema sets no bound
FRACTION_STEP = 1e-6         # ... and at most 6 decimals: greedy decoding otherwise writes 1.250000000... forever


def _bound_numbers(schema):
    """A copy of the schema for the grammar only (outputs are still checked against the caller's schema):
    numbers without bounds get +-NUMBER_LIMIT, non-integers without multipleOf get FRACTION_STEP, so every
    number ends within ~22 characters."""
    if isinstance(schema, list):
        return [_bound_numbers(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const", "default", "examples") else _bound_numbers(v)) for k, v in schema.items()}
    types = out.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    if "number" in types or "integer" in types:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -NUMBER_LIMIT
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = NUMBER_LIMIT
        if "number" in types and "multipleOf" not in out:
            out["multipleOf"] = FRACTION_STEP
    return out


def _check_schema(schema) -> None:
    """Reject a schema that is not valid JSON Schema (llguidance checks keywords it supports, not validity)."""
    try:
        import jsonschema
    except ImportError:   # pragma: no cover - llguidance still rejects what it cannot compile
        return
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "the top level"
        raise GrammarError(f"invalid JSON schema at {where}: {e.message}") from None


def tool_call_schema(tools: list[dict], name: str | None = None) -> dict:
    """OpenAI `tools` -> the JSON Schema of one call {"name": ..., "arguments": {...}} (to `name` only if given)."""
    options = []
    for t in tools:
        f = t.get("function", t)
        if name is not None and f["name"] != name:
            continue
        params = f.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise GrammarError(f"no tool named {name!r}")
    return options[0] if len(options) == 1 else {"anyOf": options}


class Constraint:
    """The live state of one constrained generation: the matcher and the next token mask."""

    _pool = ThreadPoolExecutor(1, thread_name_prefix="spark-mask")

    def __init__(self, tokenizer, grammar: str, what: str = "grammar"):
        llg = _llg()
        self.vocab = tokenizer.vocab_size
        self.what = what
        self.matcher = llg.LLMatcher(llg_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the {what} cannot be used: {_first_line(self.matcher.get_error())}")
        self.bits = llg.numpy.allocate_token_bitmask(1, self.vocab)    # int32 [1, ceil(vocab/32)]
        self._fill = llg.numpy.fill_next_token_bitmask
        self.mask_seconds = 0.0        # time spent computing masks (on the helper thread or not)
        self.wait_seconds = 0.0        # time decoding waited for a mask
        self.steps = 0
        self._pending = None
        self._done = False
        self._start()

    @classmethod
    def build(cls, tokenizer, json_schema=None, grammar=None, regex=None, json_object=False):
        what = ("JSON schema" if json_schema is not None or json_object else "regex" if regex is not None
                else "grammar")
        return cls(tokenizer, grammar_text(json_schema, grammar, regex, json_object), what)

    def _compute(self):
        import time
        t = time.perf_counter()
        self._fill(self.matcher, self.bits)
        self.mask_seconds += time.perf_counter() - t

    def _start(self):
        self._pending = self._pool.submit(self._compute)

    def mask(self) -> np.ndarray:
        """-> bool [vocab]: the tokens allowed next (waits for the helper thread if it is still at it)."""
        import time
        t = time.perf_counter()
        self._pending.result()
        self.wait_seconds += time.perf_counter() - t
        if self.matcher.is_error():
            raise GrammarError(f"constrained decoding failed: {_first_line(self.matcher.get_error())}")
        allowed = np.unpackbits(self.bits[0].view(np.uint8), bitorder="little")[:self.vocab].astype(bool)
        if not allowed.any():
            raise GrammarError(f"no token can continue the output under this {self.what} "
                               "(it cannot be satisfied from here)")
        return allowed

    def advance(self, token: int) -> None:
        """Consume the sampled token and start computing the next mask (runs while the model does)."""
        self.steps += 1
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} breaks the {self.what}: {_first_line(self.matcher.get_error())}")
        self._done = self.matcher.is_stopped()    # read now: the matcher is busy on the helper thread next
        if not self._done:
            self._start()

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing more may follow."""
        return self._done

    def close(self):
        if self._pending is not None:
            self._pending.result()


def _first_line(msg: str) -> str:
    return " ".join((msg or "unknown error").split())[:300]
