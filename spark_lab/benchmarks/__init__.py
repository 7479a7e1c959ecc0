"""Benchmarks behind `spark-lab bench WHAT`: one module per WHAT with a `main(args) -> int`.

args carries --json, --quick, --threads, --repeats and --model (see spark_lab.cli).
"""
