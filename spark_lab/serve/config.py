"""What a server serves and its limits (ServerConfig), and the constants the other parts share."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..models import CATALOGUE, DEFAULT_LLM

POLL_S = 0.25                 # how often a waiting request checks that its client is still connected
FINGERPRINT = f"spark_lab-{__version__}"
KINDS = {"llm": "a language model", "embedding": "an embedding model", "diffusion": "an image model"}


def default_parallel() -> int:
    """Slots for a machine: its cores, at least 4 and at most 16 (each slot holds a context of KV)."""
    return max(4, min(16, os.cpu_count() or 1))


@dataclass
class ServerConfig:
    default_model: str = DEFAULT_LLM      # chat/completions model when a request names none
    api_key: str | None = None            # None: no key needed; else `Authorization: Bearer <key>` on /v1
    n_ctx: int | None = None              # context of every LLM (None: the engine's default)
    max_body_bytes: int = 1 << 20         # larger request bodies get 413
    max_waiting: int = 64                 # requests waiting per model (beyond `parallel`) before 429
    parallel: int = field(default_factory=lambda: default_parallel())   # chat requests decoding at once
    timeout: float | None = 600.0         # seconds one request may take (None: no limit) before a 504
    preload: bool = False                 # load the default chat model at start (/health: 503 until ready)
    max_images: int = 4                   # `n` limit of /v1/images/generations
    models: dict = field(default_factory=dict)  # extra served models: id -> (kind, name or path)

    def served(self) -> dict[str, tuple[str, str]]:
        """model id -> (kind, what the loader gets): the catalogue, the default model, the extras."""
        out = {name: (e.kind, name) for name, e in CATALOGUE.items()}
        if self.default_model not in out:
            out[self.default_model_id] = ("llm", self.default_model)
        out.update(self.models)
        return out

    @property
    def default_model_id(self) -> str:
        m = self.default_model
        return m if m in CATALOGUE or m in self.models else Path(m).stem
