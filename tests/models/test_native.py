"""The native-library settings: which OpenBLAS kernels faiss gets, and glibc keeping freed memory for reuse.

The behaviour is checked in fresh interpreters (the settings apply when a process first imports ``models``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.native import cpu_flags, openblas_core_type

ROOT = Path(__file__).resolve().parents[2]

# The name faiss's bundled OpenBLAS reports for the kernels it chose, in a fresh interpreter.
FAISS_OPENBLAS_CORE = "from models.native import faiss_openblas_core; print(faiss_openblas_core())"

# Minor page faults of ten 20 MB allocations after a first one, with or without importing models.
REUSE_FAULTS = """
import resource, sys
if sys.argv[1] == "models":
    import models
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(20 << 20); del block
start = faults()
for _ in range(10):
    block = bytearray(20 << 20); del block
print(faults() - start)
"""


def run_python(code: str, *args: str, **environment: str) -> str:
    env = {key: value for key, value in os.environ.items()
           if key != "OPENBLAS_CORETYPE" and not key.startswith("MALLOC_")} | environment  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=True)  # fmt: skip
    return result.stdout.strip().splitlines()[-1]


def test_core_type_follows_the_widest_vector_instructions() -> None:
    avx512 = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert openblas_core_type(frozenset(avx512)) == "SkylakeX"
    assert openblas_core_type(frozenset(avx512 - {"avx512vl"})) == "Haswell"  # partial AVX-512 (Xeon Phi style)
    assert openblas_core_type(frozenset({"sse4_2", "avx", "avx2", "fma"})) == "Haswell"
    assert openblas_core_type(frozenset({"sse4_2", "avx"})) is None  # older CPUs: OpenBLAS's own detection


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2 avx2 fma\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")  # fmt: skip
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "fma"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads /proc (Linux)")
def test_faiss_openblas_runs_the_kernels_the_cpu_supports() -> None:
    expected = openblas_core_type(cpu_flags())
    if expected is None:
        pytest.skip("CPU without AVX2: OpenBLAS's own detection is kept")
    core = run_python(FAISS_OPENBLAS_CORE)
    if core == "None":
        pytest.skip("this faiss build links no separate OpenBLAS")
    assert core.lower() == expected.lower()
    assert run_python(FAISS_OPENBLAS_CORE, OPENBLAS_CORETYPE="Prescott").lower() == "prescott"  # the user's wins


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_freed_memory_is_reused_without_new_page_faults() -> None:
    tuned = int(run_python(REUSE_FAULTS, "models"))
    plain = int(run_python(REUSE_FAULTS, "plain"))
    assert tuned < 500, f"{tuned} page faults for reused memory"
    assert plain > tuned
    assert int(run_python(REUSE_FAULTS, "models", MALLOC_TOP_PAD_="0")) > tuned  # the user's malloc settings win
