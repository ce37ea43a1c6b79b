"""Fixtures shared by the whole suite: the data kit, and a private redis-server."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from support import ROOT, SETTINGS_PREFIXES, private_redis

DATA_KIT = Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts from the defaults: no service settings in the environment, and no .env file in
    the working directory (settings classes read both), so a developer's own setup never leaks in."""
    for name in list(os.environ):
        if name.startswith(SETTINGS_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def data_kit() -> Path:
    """The offline data kit (../shared/data or NANOCHAT_DATA_DIR); tests that need it skip without it."""
    if not (DATA_KIT / "pretrain").is_dir():
        pytest.skip(
            f"no data kit at {DATA_KIT}: set NANOCHAT_DATA_DIR to a folder laid out like ../shared/data"
        )
    return DATA_KIT


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of our own on a free port: tests never touch a shared Redis."""
    with private_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    """A client on an empty database."""
    client = Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()
