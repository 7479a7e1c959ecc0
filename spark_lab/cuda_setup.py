"""Which CuPy wheel fits this machine: the `cuda13` extra, `cuda12`, or none (CPU only).

Standard library only, so `make setup` can run it with the system Python before the venv
exists (`python3 spark_lab/cuda_setup.py` prints the extra, or nothing):

    nvidia-smi's header       "CUDA Version: 13.0"   -> cuda13 (cupy-cuda13x)
                              "CUDA Version: 12.8"   -> cuda12 (cupy-cuda12x)
    no nvidia-smi, a driver   /proc/driver/nvidia/version 580.x -> cuda13, 525-579 -> cuda12
    neither                   -> none

The CUDA version nvidia-smi prints is the newest the *driver* supports, which is what decides
whether a CuPy wheel (which brings its own CUDA runtime libraries) can run. CuPy publishes
both wheels for x86_64 and aarch64 (a DGX Spark's GB10 is ARM); other machines get none.
`SPARK_LAB_CUDA=cuda13|cuda12|none` overrides the detection. `make setup` records the choice
next to the venv (`--record FILE`) and `spark-lab info` reports it with the reason.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys

EXTRAS = ("cuda13", "cuda12")
ARCHES = ("x86_64", "amd64", "aarch64", "arm64")
RECORD = ".spark-lab-cuda"          # written into the venv by `make setup`


def _from_nvidia_smi() -> tuple[str | None, str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"nvidia-smi did not run ({type(e).__name__})"
    m = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", out)
    if m is None:
        return None, "nvidia-smi printed no CUDA version (no GPU visible, or the driver is not loaded)"
    major, minor = int(m.group(1)), int(m.group(2))
    gpu = re.search(r"\|\s+\d+\s+(NVIDIA [^|]*?|GeForce [^|]*?|Tesla [^|]*?)\s{2,}", out)
    name = f" on {gpu.group(1).strip()}" if gpu else ""
    return _extra_for(major), f"nvidia-smi reports CUDA {major}.{minor}{name}"


def _from_driver() -> tuple[str | None, str] | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+)\.(\d+)", text) or re.search(r"\s(\d{3})\.(\d+)", text)
    if m is None:
        return None, "an NVIDIA driver is loaded but its version is unreadable"
    drv = int(m.group(1))
    cuda = 13 if drv >= 580 else 12 if drv >= 525 else 11
    return _extra_for(cuda), f"NVIDIA driver {m.group(1)}.{m.group(2)} (supports CUDA {cuda}; no nvidia-smi)"


def _extra_for(cuda_major: int) -> str | None:
    if cuda_major >= 13:
        return "cuda13"
    if cuda_major == 12:
        return "cuda12"
    return None


def detect() -> dict:
    """{"extra": "cuda13" | "cuda12" | None, "reason": one line saying why}."""
    forced = os.environ.get("SPARK_LAB_CUDA", "").strip().lower()
    if forced:
        if forced in ("none", "cpu", "0"):
            return {"extra": None, "reason": f"SPARK_LAB_CUDA={forced}"}
        if forced not in EXTRAS:
            raise ValueError(f"SPARK_LAB_CUDA={forced!r} is not one of cuda13, cuda12, none")
        return {"extra": forced, "reason": f"SPARK_LAB_CUDA={forced}"}
    arch = platform.machine().lower()
    found = _from_nvidia_smi() or _from_driver()
    if found is None:
        return {"extra": None, "reason": "no NVIDIA GPU found (no nvidia-smi, no /proc/driver/nvidia)"}
    extra, why = found
    if extra is None:
        return {"extra": None, "reason": why + ("; CuPy needs CUDA 12 or newer" if "CUDA" in why else "")}
    if arch not in ARCHES:
        return {"extra": None, "reason": f"{why}, but CuPy has no wheel for {arch}"}
    return {"extra": extra, "reason": f"{why} ({arch})"}


def recorded(prefix: str | None = None) -> dict | None:
    """What `make setup` chose for this environment (None where it recorded nothing)."""
    path = os.path.join(prefix or sys.prefix, RECORD)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        found = detect()
    except ValueError as e:
        print(f"cuda_setup: {e}", file=sys.stderr)
        return 2
    if args[:1] == ["--record"] and len(args) == 2:
        with open(args[1], "w") as f:
            json.dump(found, f)
    elif args[:1] == ["--why"]:
        print(f"{found['extra'] or 'none'}: {found['reason']}")
        return 0
    elif args:
        print("usage: cuda_setup.py [--why | --record FILE]", file=sys.stderr)
        return 2
    if args[:1] != ["--record"]:
        print(found["extra"] or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
