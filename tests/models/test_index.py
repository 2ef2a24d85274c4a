from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from models.index import IndexError_, IndexKind, NearestNeighbourIndex


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 32)).astype(np.float32), rng.normal(size=(300, 32)).astype(np.float32)


def test_flat_search_equals_brute_force_torch(data) -> None:
    bank, queries = data
    distances, indices = NearestNeighbourIndex.build(bank, "flat").search(queries, k=3)
    brute = torch.cdist(torch.from_numpy(queries).double(), torch.from_numpy(bank).double())
    expected_distances, expected_indices = brute.topk(3, largest=False)
    assert np.array_equal(indices, expected_indices.numpy())
    np.testing.assert_allclose(distances, expected_distances.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_true_neighbours(data, kind: IndexKind) -> None:
    bank, queries = data
    _, exact = NearestNeighbourIndex.build(bank, "flat").search(queries, k=1)
    _, approx = NearestNeighbourIndex.build(bank, kind, ivf_lists=16, ivf_probe=8).search(queries, k=1)
    assert (approx[:, 0] == exact[:, 0]).mean() > 0.8


def test_index_round_trips_through_faiss_files(data, tmp_path: Path) -> None:
    bank, queries = data
    index = NearestNeighbourIndex.build(bank, "flat")
    index.save(tmp_path / "index.faiss")
    loaded = NearestNeighbourIndex.load(tmp_path / "index.faiss", "flat")
    assert np.array_equal(loaded.search(queries, 2)[1], index.search(queries, 2)[1])
    assert not loaded.on_gpu


def test_empty_index_and_wrong_dimension_are_errors(data) -> None:
    with pytest.raises(IndexError_, match="empty memory bank"):
        NearestNeighbourIndex(faiss.IndexFlatL2(8), "flat")
    with pytest.raises(IndexError_, match="queries must be"):
        NearestNeighbourIndex.build(data[0], "flat").search(np.zeros((2, 5), np.float32))


def test_corrupt_index_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(IndexError_, match="could not be read"):
        NearestNeighbourIndex.load(tmp_path / "bad.faiss", "flat")


def test_ivf_fills_every_neighbour_when_the_probed_lists_hold_fewer_than_k() -> None:
    # two far-apart clusters, 100 rows and 3: IVF's two lists hold them, so probing one list for a query beside the
    # small cluster finds 3 rows; faiss pads the rest with -1 (and huge distances), which numpy indexing (PatchCore's
    # reweighted score: bank[neighbours]) would silently wrap to the bank's last row
    rng = np.random.default_rng(0)
    bank = np.concatenate([rng.normal(size=(100, 8)), 50 + rng.normal(size=(3, 8))]).astype(np.float32)
    queries = 50 + rng.normal(size=(4, 8)).astype(np.float32)
    index = NearestNeighbourIndex.build(bank, "ivf", ivf_lists=2, ivf_probe=1)
    assert faiss.extract_index_ivf(index.cpu_index).nlist == 2
    distances, indices = index.search(queries, k=5)
    exact_distances, exact_indices = NearestNeighbourIndex.build(bank, "flat").search(queries, k=5)
    assert np.array_equal(indices, exact_indices)
    np.testing.assert_allclose(distances, exact_distances, rtol=1e-4)
