"""InHand's rounds against a real Redis, called directly (its thread not started): what it keeps, and when not."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.streams import SINK_GROUP, LineKeys
from workers.in_hand import InHand
from workers.lifecycle import WorkerRuntime


def test_time_in_hand_counts_from_when_entries_came_after_an_idle_spell(
    make_runtime: Callable[..., WorkerRuntime],
) -> None:
    # A sink's writer steps only when it takes overlays to write, so after a quiet spell longer than
    # worker.max_batch_duration_s the next result it was handed counted as in hand that long: taken for hung at the
    # keeper's first round (an error logged, neither kept nor the heartbeat refreshed) until the writer took it.
    runtime = make_runtime("sink", "s-idle")
    client, stream = runtime.client, LineKeys(runtime.config.streams.prefix, "line-1").results
    held = InHand(runtime, stream, SINK_GROUP, max_step_s=0.3)
    held.step()
    time.sleep(0.4)  # idle past max_step_s, nothing in hand
    client.ensure_group(stream, SINK_GROUP)
    client.publish(stream, b"result")
    (entry,) = client.read_new(stream, SINK_GROUP, runtime.name, 10, None)
    held.hold([entry.entry_id])
    held.keep()
    assert runtime.heartbeat.healthy()[1].get("in_hand") == 1
