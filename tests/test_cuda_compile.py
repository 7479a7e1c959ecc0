"""Every CUDA source compiles with `nvcc -ptx` (CPU-only CI catches kernel syntax errors early)."""
import shutil
import subprocess

import pytest

from spark_lab.kernels.cuda_kernels import CUDA_DIR, SOURCES


def test_there_are_cuda_sources():
    assert {"rmsnorm.cu", "softmax.cu", "rope.cu", "attention.cu", "qmatvec.cu", "mxfp4.cu"} <= set(SOURCES)


@pytest.mark.parametrize("name", SOURCES)
def test_cu_compiles_to_ptx(name, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH")
    out = tmp_path / (name + ".ptx")
    # sm_80 (A100) is the oldest target the kit cares about; warp shuffles and f16 cvt need >= sm_53
    r = subprocess.run([nvcc, "-ptx", "-arch=sm_80", "-Werror=all-warnings", "-I", str(CUDA_DIR),
                        "-o", str(out), str(CUDA_DIR / name)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"nvcc failed on {name}:\n{r.stderr}"
    ptx = out.read_text()
    stem = name[:-3]
    wanted = {"rmsnorm": ["rmsnorm_f32"], "softmax": ["softmax_f32"], "rope": ["rope_f32"],
              "attention": ["attn_decode_f32"], "qmatvec": ["qmatvec_q8_0", "qmatvec_q4_1"],
              "mxfp4": ["mxfp4_matvec", "mxfp4_moe_matvec"]}.get(stem, [])
    for kernel in wanted:
        assert f".entry {kernel}(" in ptx, f"{kernel} missing from {name}'s PTX"
