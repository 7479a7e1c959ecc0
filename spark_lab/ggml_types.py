"""The GGUF format's constants (GGMLQuantizationType, GGML_QUANT_SIZES, GGUFValueType) from gguf-py,
without the rest of gguf-py.

`import gguf` runs gguf-py's __init__, which also imports its writer, tensor-name maps, vocabulary
helpers and PyYAML: ~60 ms and ~5 MB of a cold `spark-lab generate` that needs three names. Here
gguf-py's own constants.py (its bytecode from Python's cache) runs in a namespace of its own, so the
definitions are gguf-py's, members compare and hash equal to gguf-py's (IntEnum: by value), and
they pickle by this module's name. When gguf-py is already imported, its objects are used as they are.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _constants() -> dict:
    if "gguf" in sys.modules:
        from gguf import constants
        return vars(constants)
    spec = importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("spark_lab needs gguf-py: pip install gguf")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "constants.py")
    code = importlib.machinery.SourceFileLoader("gguf.constants", path).get_code("gguf.constants")
    ns = {"__name__": __name__, "__file__": path, "__builtins__": __builtins__}
    exec(code, ns)  # noqa: S102  (gguf-py's module, run as an import would)
    return ns


_NS = _constants()
GGMLQuantizationType = _NS["GGMLQuantizationType"]
GGML_QUANT_SIZES = _NS["GGML_QUANT_SIZES"]
GGUFValueType = _NS["GGUFValueType"]
del _NS

__all__ = ["GGMLQuantizationType", "GGML_QUANT_SIZES", "GGUFValueType"]
