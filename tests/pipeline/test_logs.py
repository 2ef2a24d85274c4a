import json
import logging
import subprocess
import sys

import pytest


def _faiss_import_logs(level: str) -> list[dict[str, str]]:
    code = f"from pipeline.logs import setup_logging; setup_logging('score', {level!r}); import faiss"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(("level", "shown"), [("INFO", False), ("DEBUG", True)])
def test_faiss_loader_probing_is_only_shown_when_debugging(level: str, shown: bool) -> None:
    """faiss's loader logs each instruction set it probes at INFO ("Could not load library ..."): at the workers'
    usual level an operator should not read that as a failure."""
    records = [record for record in _faiss_import_logs(level) if record["logger"] == "faiss.loader"]
    assert bool(records) == shown
    assert all(record["role"] == "score" for record in records)


def test_plain_lines_keep_the_records_fields() -> None:
    from pipeline.logs import PlainFormatter

    message = "redis unavailable, retrying"
    record = logging.LogRecord("pipeline.streams", logging.WARNING, __file__, 1, message, (), None)
    record.op, record.error = "read_health", "Connection refused"
    line = PlainFormatter().format(record)
    assert line.endswith(f"WARNING pipeline.streams: {message} (op=read_health, error=Connection refused)")
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "no fields", (), None)
    assert PlainFormatter().format(plain).endswith("INFO x: no fields")
