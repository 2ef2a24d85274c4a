"""What deploy/README.md's "Beyond one machine" relies on: a line id written as a Redis Cluster hash tag puts all of
the line's keys in one slot (they meet in MULTI/EXEC and in the sink's Lua script), and the rest of the pipeline
takes such an id as it is."""

from __future__ import annotations

from pathlib import Path

from redis.crc import key_slot

from pipeline.streams import LineKeys
from workers.heatmaps import HeatmapStore


def slots(keys: LineKeys) -> set[int]:
    names = [keys.frames, keys.results, keys.decisions, keys.deadletter, keys.model, keys.published("cam1-0001")]
    return {key_slot(name.encode()) for name in names}


def test_a_braced_line_id_keeps_every_key_of_the_line_in_one_cluster_slot() -> None:
    assert len(slots(LineKeys("lineinspect", "{line-1}"))) == 1
    assert slots(LineKeys("lineinspect", "{line-1}")) != slots(LineKeys("lineinspect", "{line-2}"))
    assert len(slots(LineKeys("lineinspect", "line-1"))) > 1  # without braces the keys scatter over the shards


def test_a_braced_line_id_makes_a_plain_heatmap_directory(tmp_path: Path) -> None:
    path = HeatmapStore(tmp_path, max_files=10, max_age_s=60).path_for("{line-1}", "cam1-0001")
    assert path.parent.parent == tmp_path
    assert path.parent.name.startswith("_line-1_~")  # braces replaced, plus a hash: no other line id shares it
