"""Decoder-only LLMs from GGUF files on spark_lab kernels: engine, samplers, chat."""
from .engine import LLM, Generation, ContextOverflow  # noqa: F401
from .chat import ChatSession  # noqa: F401
from .sampling import SamplingParams, sample  # noqa: F401
