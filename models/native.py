"""Settings of the native libraries under torch and faiss, applied once when ``models`` is first imported.

Two settings that the libraries' own defaults get wrong on the virtual machines lineinspect runs on (measured in
benchmarks/RESULTS.md section 2, session 14):

- **OpenBLAS core type.** faiss-cpu ships its own OpenBLAS (0.3.15), which computes exact flat search as matrix
  products. On CPUs newer than it knows (a virtualised Sapphire Rapids reporting itself as "Intel Xeon Processor")
  it falls back to its generic SSE3 kernels ("Prescott"): 36 instead of 140 GFLOP/s, and the nearest-neighbour
  search took 52 instead of 15 ms per image. ``OPENBLAS_CORETYPE`` names the kernel to use; it is read when the
  library loads, so it is set here, before faiss is imported, from the CPU's instruction-set flags
  (``openblas_core_type``), and only when the user has not set it.
- **glibc malloc.** Scoring allocates and frees tensors of tens of MB each batch. glibc returns freed memory at the
  top of its heap to the kernel once it exceeds the trim threshold and maps larger blocks afresh (its dynamic
  thresholds follow the blocks freed), so every batch touched new pages: 1.2 to 1.6 million page faults in 20
  batches, about a fifth of the CPU time in the kernel. A fixed mmap threshold (32 MB, glibc's largest) and a
  256 MB trim threshold keep freed memory for the next batch: backbone 22 -> 16 ms per image, and a mix of plain
  and shifted batches scored 1.8x as fast (benchmarks/memory_soak.py). The price: a scorer's resident size levels
  off about 0.5 GB higher (2.0 instead of 1.5 GB for the default model, flat from the 100th of 300 batches).
  Skipped when any ``MALLOC_*_`` variable or ``GLIBC_TUNABLES`` is set (the user's settings win) and on C
  libraries without ``mallopt``.

``configure_native_libraries()`` is idempotent and returns what it applied (``NativeSettings``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc refuses larger values (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 256 << 20  # 64 MB to 1 GB scored alike (memory_soak.py); more keeps more memory idle

SKYLAKE_X_FLAGS = frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})
HASWELL_FLAGS = frozenset({"avx2", "fma"})


@dataclass(frozen=True)
class NativeSettings:
    openblas_core_type: str | None  # what OPENBLAS_CORETYPE holds for libraries loaded from now on (None: unset)
    malloc_tuned: bool  # mallopt applied the thresholds above


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``cpuinfo`` (Linux); empty when it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def openblas_core_type(flags: frozenset[str]) -> str | None:
    """The OpenBLAS kernel family these flags can run: ``SkylakeX`` (AVX-512), ``Haswell`` (AVX2 + FMA), else None
    (leave OpenBLAS's own detection, which handles older CPUs)."""
    if SKYLAKE_X_FLAGS.issubset(flags):
        return "SkylakeX"
    if HASWELL_FLAGS.issubset(flags):
        return "Haswell"
    return None


def _tune_malloc() -> bool:
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    try:
        mallopt = ctypes.CDLL(library).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def faiss_openblas_core() -> str | None:
    """The kernel family faiss's own OpenBLAS chose (``openblas_get_corename``: e.g. "SkylakeX", "Prescott" for its
    generic kernels); imports faiss. None when faiss links no separate OpenBLAS or /proc cannot be read."""
    import faiss  # noqa: F401  (loads its OpenBLAS)

    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps if "libopenblas" in line and "faiss" in line}
    if not paths:
        return None
    corename = ctypes.CDLL(paths.pop()).openblas_get_corename
    corename.restype = ctypes.c_char_p
    return str(corename().decode())


_applied: NativeSettings | None = None


def configure_native_libraries() -> NativeSettings:
    """Set ``OPENBLAS_CORETYPE`` (unless set, or faiss is already loaded) and glibc's malloc thresholds, once."""
    global _applied
    if _applied is None:
        if "OPENBLAS_CORETYPE" not in os.environ and "faiss" not in sys.modules:
            core_type = openblas_core_type(cpu_flags())
            if core_type is not None:
                os.environ["OPENBLAS_CORETYPE"] = core_type
        _applied = NativeSettings(os.environ.get("OPENBLAS_CORETYPE"), _tune_malloc())
    return _applied
