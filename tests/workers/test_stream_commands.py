"""The CLI surface: check exits 0/1 from Redis heartbeats, promote announces models, parsers reject bad input."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
from pathlib import Path

import pytest

from models.artifact import _write_manifest, read_manifest
from pipeline.config import RedisSettings, StreamSettings
from pipeline.streams import LineKeys, StreamClient, health_key
from tests.workers.conftest import TinyLine
from workers.cli import main
from workers.stream_commands import SCORE_WORKER_COMMAND, add_stream_commands


@pytest.fixture
def client(redis_url: str, stream_prefix: str, monkeypatch: pytest.MonkeyPatch) -> StreamClient:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("LINEINSPECT__STREAMS__PREFIX", stream_prefix)
    return StreamClient(redis_url, RedisSettings(), StreamSettings(prefix=stream_prefix))


def test_check_follows_heartbeats(client: StreamClient, stream_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 1
    client.write_health(
        health_key(stream_prefix, "score", "w1"), {"role": "score", "name": "w1", "line": "line-1", "state": "ok"}, 30
    )
    assert main(["check", "--role", "score", "--line", "line-1"]) == 0
    assert main(["check", "--role", "sink"]) == 1
    client.write_health(
        health_key(stream_prefix, "score", "w2"),
        {"role": "score", "name": "w2", "line": "line-1", "state": "failed"},
        30,
    )
    assert main(["check", "--role", "score"]) == 1
    output = capsys.readouterr().out
    assert json.loads(output[output.rindex('{\n  "healthy"') :])["healthy"] is False
    assert main(["check", "--role", "score", "--name", "w1"]) == 0  # a container checks only its own worker
    assert main(["check", "--role", "score", "--name", "w2"]) == 1
    assert main(["check", "--name", "w3"]) == 1


def test_promote_announces_only_models_that_load(
    client: StreamClient, stream_prefix: str, tmp_path: Path, tiny_line: TinyLine, capsys: pytest.CaptureFixture[str]
) -> None:
    """The key outlives the workers: a model that cannot load would be what every restarted worker is told to use."""
    key = LineKeys(stream_prefix, "line-1")
    assert main(["promote", "--line", "line-1", "--model", str(tmp_path)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_line.model_dir, broken)
    (broken / "bank.npy").write_bytes(b"garbage")
    assert main(["promote", "--line", "line-1", "--model", str(broken)]) == 2
    error = capsys.readouterr().err
    assert f"lineinspect promote: error: {broken.resolve()} was not promoted" in error  # every command's error form
    assert "bank.npy does not match its sha256" in error
    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(tiny_line.model_dir, uncalibrated)
    manifest = read_manifest(uncalibrated) | {"threshold": None}
    _write_manifest(uncalibrated, manifest)
    assert main(["promote", "--line", "line-1", "--model", str(uncalibrated)]) == 2
    error = capsys.readouterr().err
    assert f"lineinspect promote: error: {uncalibrated.resolve()} was not promoted: it has no threshold" in error
    assert client.get_model_dir(key) is None
    assert main(["promote", "--line", "line-1", "--model", str(tiny_line.model_dir)]) == 0
    assert client.get_model_dir(key) == str(tiny_line.model_dir.resolve())
    assert read_manifest(tiny_line.model_dir)["model_id"] in capsys.readouterr().out


def test_promote_gives_up_on_an_unreachable_redis_with_one_line_and_exit_1(
    tiny_line: TinyLine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator's one-shot command must not wait for Redis forever as a worker does; exit 1, as every command
    that loses Redis (cli.main turns StreamsUnavailable into it)."""
    with socket.socket() as placeholder:  # a port nothing listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("LINEINSPECT__REDIS__CONNECT_TIMEOUT_S", "0.5")
    assert main(["promote", "--line", "line-1", "--model", str(tiny_line.model_dir)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("lineinspect promote: error: "), errors
    assert "redis unreachable, exiting" in caplog.text and "entries in hand" not in caplog.text  # a worker's words


def test_workers_refuse_to_start_without_redis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["sink"]) == 2
    assert "no Redis configured" in capsys.readouterr().err


def test_a_port_in_use_is_a_one_line_error_naming_its_setting(
    client: StreamClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("LINEINSPECT__SINK__METRICS_PORT", str(port))
        assert main(["sink", "--line", "line-1"]) == 2
    error = capsys.readouterr().err
    assert f"sink.metrics_port: cannot serve /healthz and /metrics on port {port}" in error
    assert "Traceback" not in error


def test_replay_needs_a_shadow_line_and_a_writable_report_before_it_sends_anything(
    client: StreamClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(tmp_path / "rec.lir")]) == 2
    assert "replay needs --line" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file, not a directory")
    report = tmp_path / "taken" / "report.json"
    assert main(["replay", str(tmp_path / "rec.lir"), "--line", "shadow", "--report", str(report)]) == 2
    assert f"--report {report} cannot be written" in capsys.readouterr().err


def test_every_command_is_registered_with_a_handler() -> None:
    parser = argparse.ArgumentParser()
    add_stream_commands(parser.add_subparsers(dest="command"))
    for argv in (
        ["run"],
        ["ingest", "--source", "folder:x"],
        [SCORE_WORKER_COMMAND],
        ["sink"],
        ["check"],
        ["record", "--out", "f"],
        ["replay", "f"],
        ["promote", "--model", "m"],
        ["forget-line", "--line", "l"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func) and args.config is None


def test_verbose_flag_turns_on_the_workers_debug_logs(
    client: StreamClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers import sink

    monkeypatch.setenv("LINEINSPECT__SINK__METRICS_PORT", "0")
    monkeypatch.setenv("LINEINSPECT__SINK__HEATMAP_DIR", str(tmp_path))
    monkeypatch.setattr(sink.SinkWorker, "run", lambda self: logging.getLogger("workers.sink").debug("debug is on"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        assert main(["sink", "--name", "quiet"]) == 0
        assert "debug is on" not in capsys.readouterr().err
        assert main(["-v", "sink", "--name", "verbose"]) == 0
        logs = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        assert {"msg": "debug is on", "level": "debug", "role": "sink", "worker": "verbose"}.items() <= next(
            log for log in logs if log["msg"] == "debug is on"
        ).items()
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


def test_ingest_refuses_ids_and_metadata_its_frames_could_not_carry(
    client: StreamClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # each was accepted, then every frame was refused (ingest stopped at its first frame, or the scorer
    # dead-lettered them all as invalid_fields)
    (tmp_path / "a.png").write_bytes(b"sent as it is")
    source = f"folder:{tmp_path}"
    assert main(["ingest", "--source", source, "--line", "line\n1"]) == 2
    assert "--line 'line\\n1' holds control character U+000A" in capsys.readouterr().err
    assert main(["ingest", "--source", f"{'c' * 300}={source}"]) == 2
    assert "is 317 characters; ids hold at most 256" in capsys.readouterr().err
    assert main(["ingest", "--source", source, "--metadata", f"recipe={'x' * 70_000}"]) == 2
    assert "--metadata: keys and str values hold at least 70006 bytes" in capsys.readouterr().err
    many = [f"--metadata=k{index}=v" for index in range(257)]
    assert main(["ingest", "--source", source, *many]) == 2
    assert "--metadata: 257 entries; a frame's metadata holds at most 256" in capsys.readouterr().err
