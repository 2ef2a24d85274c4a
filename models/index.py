"""Nearest-neighbour search over a memory bank with faiss, one interface for every index kind.

``NearestNeighbourIndex.build(bank, kind)`` makes an exact ``flat`` L2 index (default), an ``ivf`` (inverted
lists, for large banks) or an ``hnsw`` graph. ``search(queries (Q, channels), k)`` returns Euclidean
``distances (Q, k)`` and bank ``indices (Q, k)``, nearest first; an IVF query whose probed lists hold fewer than
``k`` rows is searched again over every list, so every index is a bank row. When CUDA and a faiss GPU build are both
present the flat/IVF index is copied to the GPU; otherwise it stays on the CPU. Files are always written from
the CPU copy with ``faiss.write_index`` (faiss's own binary format, not pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import faiss
import numpy as np

IndexKind = Literal["flat", "ivf", "hnsw"]


class IndexError_(RuntimeError):
    """An index that cannot be built, loaded or searched."""


def gpu_available() -> bool:
    """True when this faiss build has GPU support and a CUDA device is visible."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(hasattr(faiss, "StandardGpuResources") and get_num_gpus is not None and get_num_gpus() > 0)


class NearestNeighbourIndex:
    def __init__(self, cpu_index: faiss.Index, kind: IndexKind, use_gpu: bool = False, ivf_probe: int = 8) -> None:
        if cpu_index.ntotal == 0:
            msg = "cannot search an empty memory bank: fit the model on good images first"
            raise IndexError_(msg)
        self.kind = kind
        self.cpu_index = cpu_index
        self.dimension = int(cpu_index.d)
        if kind == "ivf":
            faiss.extract_index_ivf(cpu_index).nprobe = ivf_probe
        self._search_index = cpu_index
        self.on_gpu = False
        if use_gpu and kind != "hnsw" and gpu_available():
            self._gpu_resources = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, cpu_index)
            self.on_gpu = True

    @classmethod
    def build(
        cls,
        bank: np.ndarray,
        kind: IndexKind = "flat",
        use_gpu: bool = False,
        ivf_lists: int = 256,
        ivf_probe: int = 8,
        hnsw_neighbors: int = 32,
    ) -> NearestNeighbourIndex:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        rows, dimension = bank.shape
        index: faiss.Index
        if kind == "flat":
            index = faiss.IndexFlatL2(dimension)
        elif kind == "ivf":
            lists = max(1, min(ivf_lists, rows // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dimension), dimension, lists)
            index.train(bank)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dimension, hnsw_neighbors)
        else:
            msg = f"unknown index kind {kind!r}; use flat, ivf or hnsw"
            raise IndexError_(msg)
        index.add(bank)
        return cls(index, kind, use_gpu=use_gpu, ivf_probe=ivf_probe)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``queries (Q, channels)`` -> Euclidean ``distances (Q, k)`` and ``indices (Q, k)``."""
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            msg = f"queries must be (Q, {self.dimension}), got {queries.shape}"
            raise IndexError_(msg)
        k = min(k, int(self.cpu_index.ntotal))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        squared, indices = self._search_index.search(queries, k)
        unfilled = (indices == -1).any(axis=1)
        if unfilled.any() and self.kind == "ivf":
            # the probed lists held fewer than k rows: faiss pads with -1 (which numpy indexing would wrap to the
            # bank's last row) and ~3e38; those queries are searched again over every list, i.e. exactly
            every_list = faiss.SearchParametersIVF()
            every_list.nprobe = faiss.extract_index_ivf(self.cpu_index).nlist
            squared[unfilled], indices[unfilled] = self.cpu_index.search(queries[unfilled], k, params=every_list)
        return np.sqrt(np.maximum(squared, 0.0)), indices

    def save(self, path: Path) -> None:
        faiss.write_index(self.cpu_index, str(path))

    @classmethod
    def load(cls, path: Path, kind: IndexKind, use_gpu: bool = False, ivf_probe: int = 8) -> NearestNeighbourIndex:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            msg = f"faiss index {path} could not be read: {str(error).splitlines()[0]}"
            raise IndexError_(msg) from None
        return cls(index, kind, use_gpu=use_gpu, ivf_probe=ivf_probe)
