"""Modules that need the VIMS runtime fail with Ansible's missing-library message
when the task's interpreter lacks it (the controller venv has no ``vims``)."""

from __future__ import annotations

import pytest
from ansible_collections.vims.attestation.plugins.modules import (
    baseline,
    enroll,
    profile,
    vmi_check,
)

from ..conftest import run_module


@pytest.mark.parametrize(("main", "args"), [
    (vmi_check.main, {"memory": "/nonexistent.ram", "profile": "/p.json"}),
    (profile.main, {"kernel": "/vmlinuz", "dest": "/p.json"}),
    (baseline.main, {"profile": "/p.json", "dest": "/b.json", "rootfs": "/"}),
    (enroll.main, {"config": "/avm.toml", "rems_url": "http://127.0.0.1:9", "token": "x" * 20}),
])
def test_missing_runtime_is_reported(main: object, args: dict[str, object]) -> None:
    pytest.importorskip("ansible")
    try:
        import vims  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("this interpreter has the runtime")
    failed, r = run_module(main, args)
    assert failed
    assert "Failed to import the required Python library (vims" in str(r["msg"])


def test_vmi_check_needs_exactly_one_target() -> None:
    failed, r = run_module(vmi_check.main, {"profile": "/p.json"})
    assert failed
    assert "one of the following is required: memory, domain" in str(r["msg"])
    failed, r = run_module(vmi_check.main, {"profile": "/p.json", "memory": "/m",
                                            "domain": "d"})
    assert failed
    assert "mutually exclusive" in str(r["msg"])


def test_enroll_does_nothing_in_check_mode() -> None:
    failed, r = run_module(enroll.main, {"config": "/avm.toml", "rems_url": "http://x:1",
                                         "token": "x" * 20}, check_mode=True)
    assert not failed
    assert not r["changed"]
    assert r["skipped"]
