"""Kernel roofline on this machine: `python benchmarks/kernels.py [--quick] [--json] [--threads N]`.

The same as `spark-lab bench kernels`; the work is in spark_lab/benchmarks/kernels.py.
"""
import argparse
import sys

from spark_lab.benchmarks.kernels import main
from spark_lab.device import set_threads

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (CI)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    set_threads(args.threads)
    sys.exit(main(args))
