"""The tests in this directory run on both lab kernels.

These fixtures override the session's ``lab``, ``profile_path`` and ``baseline_path`` with
module-scoped ones parametrized over the first guest (Debian 12's current 6.1
kernel) and the second (its 6.12), so every fixture and test built on them runs
once per kernel.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import Guest

from vims.lab import Lab


@pytest.fixture(scope="module", params=["first_guest", "second_guest"], ids=["6.1", "6.12"])
def guest(request: pytest.FixtureRequest) -> Guest:
    found: Guest = request.getfixturevalue(request.param)
    return found


@pytest.fixture(scope="module")
def lab(guest: Guest) -> Lab:
    return guest.lab


@pytest.fixture(scope="module")
def profile_path(guest: Guest) -> Path:
    return guest.profile


@pytest.fixture(scope="module")
def baseline_path(guest: Guest) -> Path:
    return guest.baseline
