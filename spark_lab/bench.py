"""`spark-lab bench WHAT`: run `spark_lab.benchmarks.<WHAT>:main(args)`."""
from __future__ import annotations

import importlib


def cmd_bench(args) -> int:
    name = f"spark_lab.benchmarks.{args.what}"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise ValueError(f"no benchmark named {args.what!r} (spark_lab/benchmarks/{args.what}.py is missing)") from None
        raise
    return int(mod.main(args) or 0)
