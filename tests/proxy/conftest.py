"""Fixtures shared by the proxy tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def sides() -> Iterator[list[Any]]:
    """Sidecars a test starts (anything with close()), closed when it ends, pass or fail."""
    made: list[Any] = []
    yield made
    for side in made:
        side.close()
