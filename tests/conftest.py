"""Fixtures shared across test folders (none of them autouse)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one torch thread (restored after).

    The CI box has 2 cores shared with other jobs; tiny convs are fastest single-threaded.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
