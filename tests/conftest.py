"""Shared fixtures: a real Redis for every test that needs one, and a unique key prefix per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from pipeline.config import Config, config_from_mapping
from pipeline.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set (CI's real Redis), else a private redis-server on a free port for this session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def stream_prefix() -> str:
    """A key prefix no other test uses, so tests sharing one Redis never see each other's streams."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def config(redis_url: str, stream_prefix: str) -> Config:
    return config_from_mapping(
        {
            "redis": {"url": redis_url, "reconnect_max_backoff_s": 0.5},
            "streams": {"prefix": stream_prefix, "block_ms": 50, "claim_idle_ms": 500},
        }
    )
