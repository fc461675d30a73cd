"""Shared fixtures: real clusters of coordinator and agent processes on loopback."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from microswarm.cluster import LocalCluster  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Two agents, shared by the non-destructive tests of a module."""
    c = LocalCluster(agents=2, slots=2, workdir=str(tmp_path_factory.mktemp("cluster")))
    with c:
        yield c


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of its own, for tests that kill or break things."""
    c = LocalCluster(agents=2, slots=2, workdir=str(tmp_path))
    with c:
        yield c
