"""``lineinspect forget-line`` against a real redis-server: it removes a retired line's keys and no other line's,
and refuses while the line's workers beat or its frames wait for a decision."""

from __future__ import annotations

import io
import socket
from typing import Any

import pytest
import redis

from pipeline.config import RedisSettings, StreamSettings
from pipeline.redis_server import EmbeddedRedis
from pipeline.streams import (
    SCORER_GROUP,
    SINK_GROUP,
    UNLINK_BATCH,
    Commit,
    DeadLetter,
    LineKeys,
    StreamClient,
    health_key,
    trimmed_unread_key,
)
from workers.cli import main


@pytest.fixture
def client(redis_url: str, stream_prefix: str, monkeypatch: pytest.MonkeyPatch) -> StreamClient:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("LINEINSPECT__STREAMS__PREFIX", stream_prefix)
    return StreamClient(redis_url, RedisSettings(), StreamSettings(prefix=stream_prefix))


def run_line(client: StreamClient, keys: LineKeys, frames: int = 3) -> list[str]:
    """A line that ran and stopped, through the client's own operations: every frame decided (one dead-lettered,
    whose commit leaves its reply key), a model key, a trimmed-unread hash, and the sink's empty results stream."""
    ids = [client.publish(keys.frames, f"frame {index}".encode()) for index in range(frames)]
    client.ensure_group(keys.frames, SCORER_GROUP)
    client.ensure_group(keys.results, SINK_GROUP)
    assert len(client.read_new(keys.frames, SCORER_GROUP, "score-a", frames, None)) == frames
    letter = DeadLetter(ids[0], b"garbage", "not_msgpack", "not msgpack", frame_id="cam-0")
    client.commit(keys.frames, SCORER_GROUP, Commit(dead_letters=[letter], acks=ids), keys.deadletter)
    for index, entry_id in enumerate(ids[1:], start=1):
        assert client.publish_decision_once(keys, f"cam-{index}", b"decision", 600, entry_id)
    client.set_model_dir(keys, "/models/v1")
    client.redis.hset(trimmed_unread_key(keys.frames), mapping={SCORER_GROUP: 0})
    return ids


def snapshot(client: StreamClient, prefix: str) -> dict[str, Any]:
    """Every key under ``prefix`` with a dump of its value."""
    return {name.decode(): client.redis.dump(name) for name in client.redis.scan_iter(match=f"{prefix}:*", count=1000)}


def line_keys_left(client: StreamClient, keys: LineKeys) -> set[str]:
    return {name for name in snapshot(client, keys.prefix) if name.startswith(f"{keys.prefix}:{keys.line_id}:")}


def test_removes_every_key_of_the_line_and_nothing_of_lines_whose_ids_it_begins(
    client: StreamClient, stream_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """line-1's keys go; line-10's, line-1:x's (colons are valid in ids), line-1*'s and the heartbeats stay."""
    retired = LineKeys(stream_prefix, "line-1")
    run_line(client, retired)
    own = line_keys_left(client, retired)
    assert own >= {
        retired.frames, retired.results, retired.decisions, retired.deadletter, retired.model,
        trimmed_unread_key(retired.frames), retired.published("cam-1"), retired.published("cam-2"),
    }  # fmt: skip
    assert len(own) == 9  # and the dead letter's commit-reply key
    for other in ("line-10", "line-1:x", "line-1*", "line-1:published:cam"):
        # each by a client of its own: a client's next commit deletes its last commit-reply key, line-1's here
        run_line(StreamClient(client.url, RedisSettings(), client.settings), LineKeys(stream_prefix, other))
    client.write_health(health_key(stream_prefix, "score", "w10"), {"line": "line-10", "state": "ok"}, 30)
    others = {name: value for name, value in snapshot(client, stream_prefix).items() if name not in own}
    # line-1:published:cam's keys are named like line-1's published markers; its own markers could be either line's
    shared = LineKeys(stream_prefix, "line-1:published:cam").published("cam-1")
    assert shared == retired.published("cam:published:cam-1") and shared in others

    assert main(["forget-line", "--line", "line-1", "--yes"]) == 0
    out = capsys.readouterr().out
    assert snapshot(client, stream_prefix) == others  # byte for byte
    assert "left alone: 9 keys that another line's names also give (ids may hold colons)" in out
    assert "removed 9 keys of line 'line-1'" in out

    assert main(["forget-line", "--line", "line-1*", "--yes"]) == 0  # a glob character is itself, not a wildcard
    assert not line_keys_left(client, LineKeys(stream_prefix, "line-1*"))
    assert line_keys_left(client, LineKeys(stream_prefix, "line-10"))
    assert line_keys_left(client, LineKeys(stream_prefix, "line-1:x"))
    # its streams and model key go; its markers and commit-reply key, which could be line-1's markers, stay to expire
    colon_line = LineKeys(stream_prefix, "line-1:published:cam")
    assert main(["forget-line", "--line", colon_line.line_id, "--yes"]) == 0
    left = line_keys_left(client, colon_line)
    assert {name for name in left if ":commit:" not in name} == {colon_line.published(f"cam-{n}") for n in (1, 2)}
    assert all(client.redis.ttl(name) > 0 for name in left) and len(left) == 3


def test_lists_sizes_asks_and_removes_only_when_confirmed(
    client: StreamClient, stream_prefix: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = LineKeys(stream_prefix, "shadow")
    client.publish(keys.frames, b"x" * 200_000)  # a frame never scored: no group yet
    before = snapshot(client, stream_prefix)

    assert main(["forget-line", "--line", "shadow", "--dry-run"]) == 0
    captured = capsys.readouterr()
    listed = {line.split()[1]: line for line in captured.out.splitlines()[1:]}
    assert " 1 entries, 0.2 MB" in listed[keys.frames]  # MEMORY USAGE of a 200 kB entry
    assert "would refuse: frames of line 'shadow' have no decision yet: 0 pending on scorers, 1 not yet read" in (
        captured.err
    )
    assert snapshot(client, stream_prefix) == before

    for answer in ("n\n", "", "yes please\n"):  # "" is the end of input: no terminal, nothing piped
        monkeypatch.setattr("sys.stdin", io.StringIO(answer))
        assert main(["forget-line", "--line", "shadow", "--discard-undecided"]) == 1
        assert "nothing removed" in capsys.readouterr().out
        assert snapshot(client, stream_prefix) == before
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert main(["forget-line", "--line", "shadow", "--discard-undecided"]) == 0
    assert snapshot(client, stream_prefix) == {}
    assert main(["forget-line", "--line", "shadow"]) == 0  # nothing left: nothing to ask
    assert "nothing to remove" in capsys.readouterr().out


def test_refuses_while_a_worker_of_the_line_beats_naming_it(
    client: StreamClient, stream_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = LineKeys(stream_prefix, "line-1")
    run_line(client, keys)
    status = {"role": "sink", "name": "sink-a", "host": "cell-3", "pid": 4242, "line": "line-1", "state": "ok"}
    client.write_health(health_key(stream_prefix, "sink", "sink-a"), status, 30)
    stopped = {"role": "score", "name": "score-b", "line": "line-1", "state": "stopped"}
    client.write_health(health_key(stream_prefix, "score", "score-b"), stopped, 30)
    client.write_health(health_key(stream_prefix, "score", "score-c"), {"line": "line-10", "state": "ok"}, 30)
    before = snapshot(client, stream_prefix)

    assert main(["forget-line", "--line", "line-1", "--yes"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert errors == [
        "lineinspect forget-line: error: line 'line-1' has workers running (fresh heartbeats): sink sink-a (host "
        "cell-3, pid 4242, ok); stop them first (a running worker writes the line's keys again and loses the frames "
        "it holds), or --force"
    ]
    assert snapshot(client, stream_prefix) == before
    assert main(["forget-line", "--line", "line-1", "--yes", "--force"]) == 0
    assert not line_keys_left(client, keys)


def test_refuses_while_frames_wait_for_a_decision_and_can_keep_the_dead_letters(
    client: StreamClient, stream_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = LineKeys(stream_prefix, "line-1")
    run_line(client, keys)
    for payload in (b"delivered, not acknowledged", b"not yet read", b"not yet read either"):
        client.publish(keys.frames, payload)
    client.read_new(keys.frames, SCORER_GROUP, "score-a", 1, None)
    client.publish(keys.results, b"scored, not yet published")
    before = snapshot(client, stream_prefix)

    assert main(["forget-line", "--line", "line-1", "--yes"]) == 2
    assert ("error: frames of line 'line-1' have no decision yet: 1 pending on scorers, 2 not yet read by any, 1 "
            "scored and waiting for the sink;") in capsys.readouterr().err  # fmt: skip
    assert snapshot(client, stream_prefix) == before

    assert main(["forget-line", "--line", "line-1", "--yes", "--discard-undecided", "--keep-deadletters"]) == 0
    out = capsys.readouterr().out
    removed = int(out.split("removed ")[1].split()[0])
    assert f"'line-1' (prefix {stream_prefix!r}): {removed} keys to remove" in out  # the kept stream not counted
    assert line_keys_left(client, keys) == {keys.deadletter}
    assert client.dead_letters(keys)[0]["reason"] == "not_msgpack"


def test_a_missing_line_and_an_unreachable_redis_are_one_line_errors(
    client: StreamClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LINEINSPECT__WORKER__LINE_ID", "line-1")  # never taken for the line to forget
    assert main(["forget-line", "--yes"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert errors == ["lineinspect forget-line: error: forget-line needs --line: the line whose keys to remove "
                      "(worker.line_id is never taken for it)"]  # fmt: skip
    with socket.socket() as placeholder:  # a port nothing listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("LINEINSPECT__REDIS__CONNECT_TIMEOUT_S", "0.5")
    assert main(["forget-line", "--line", "line-1", "--yes"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("lineinspect forget-line: error: redis at "), errors


def test_a_line_named_under_the_heartbeats_is_refused_and_no_heartbeat_is_removed(
    client: StreamClient, stream_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Line 'health:score''s model key would be P:health:score:model: the heartbeat of a scorer named 'model'.
    forget-line removed that heartbeat (of line-1's running scorer) as the line's model key."""
    beat = health_key(stream_prefix, "score", "model")
    client.write_health(beat, {"role": "score", "name": "model", "line": "line-1", "state": "ok"}, 30)
    assert LineKeys(stream_prefix, "health:score").model == beat
    before = snapshot(client, stream_prefix)

    assert main(["forget-line", "--line", "health:score", "--yes"]) == 2
    error = capsys.readouterr().err
    assert "--line 'health:score' is reserved: 'health' names the workers' heartbeat keys" in error
    assert snapshot(client, stream_prefix) == before


def test_redis_lost_part_way_says_what_was_removed_and_a_second_run_removes_the_rest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys go in batches of UNLINK_BATCH: a Redis lost after the first left the line half forgotten, and the command
    said only 'unreachable during unlink' (and a worker's 'entries in hand stay pending'), not that keys were gone."""
    with EmbeddedRedis(persistent=True) as server:  # its own server: this test stops it
        monkeypatch.setenv("REDIS_URL", server.url)
        monkeypatch.setenv("LINEINSPECT__REDIS__CONNECT_TIMEOUT_S", "0.5")
        client = StreamClient(server.url, RedisSettings(), StreamSettings())
        keys = LineKeys(client.settings.prefix, "retired")
        run_line(client, keys)
        markers = UNLINK_BATCH + 100 - len(line_keys_left(client, keys))
        for number in range(markers):  # a line's published markers, many more than its other keys
            client.redis.zadd(keys.published(f"old-{number}"), {"1-0": 1.0})
            client.redis.expire(keys.published(f"old-{number}"), 600)
        total = len(line_keys_left(client, keys))
        unlink = redis.Redis.unlink
        batches: list[int] = []

        def server_lost_after_the_first_batch(self: redis.Redis, *names: str) -> Any:
            batches.append(len(names))
            if len(batches) == 2:
                server.stop(kill=True)  # the real server goes: the second UNLINK meets a closed port
            return unlink(self, *names)

        monkeypatch.setattr(redis.Redis, "unlink", server_lost_after_the_first_batch)
        assert main(["forget-line", "--line", "retired", "--yes"]) == 1
        error = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert len(error) == 1 and "unreachable during unlink" in error[0]
        assert (f"{UNLINK_BATCH} of the {total} keys of line 'retired' were removed before, the others are still "
                "there: run forget-line again once Redis answers to remove them") in error[0]  # fmt: skip
        monkeypatch.setattr(redis.Redis, "unlink", unlink)
        server.start()  # appendfsync always: what the first batch removed stays removed
        assert len(line_keys_left(client, keys)) == total - UNLINK_BATCH
        assert main(["forget-line", "--line", "retired", "--yes"]) == 0
        assert f"removed {total - UNLINK_BATCH} keys of line 'retired'" in capsys.readouterr().out
        assert not line_keys_left(client, keys)
