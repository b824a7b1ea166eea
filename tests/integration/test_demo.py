"""The README's main job, run as a user would (it boots and tears down its own lab)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import vims

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_demo_passes_clean_and_fails_attacked() -> None:
    name = f"demo-{os.getpid()}"
    proc = vims("demo", "--name", name, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("— PASS") == 2
    assert out.count("— FAIL") == 1
    assert "syscall 39 hooked" in out
    assert "is hidden from the task list" in out
    assert "clean C-VM passes, attacked C-VM fails" in out
    assert f"lab '{name}' down" in out
    assert not os.path.exists(f"/dev/shm/vims-{name}.ram")
