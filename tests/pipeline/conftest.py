"""Fixtures of the pipeline tests that talk to Redis: a StreamClient on the test's real server and line-1's keys."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.config import Config
from pipeline.streams import LineKeys, StreamClient


@pytest.fixture
def client(config: Config) -> Iterator[StreamClient]:
    stream_client = StreamClient(config.redis.url or "", config.redis, config.streams)
    yield stream_client
    stream_client.close()


@pytest.fixture
def keys(config: Config) -> LineKeys:
    return LineKeys(config.streams.prefix, "line-1")
