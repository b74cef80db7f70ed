"""Fixtures of the training tests (helpers live in train_helpers.py)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """One intra-op thread: bitwise-reproducible CPU math and no oversubscription of the shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
