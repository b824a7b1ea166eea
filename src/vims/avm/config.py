"""A-VM agent configuration: a TOML file, validated strictly."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from vims.errors import VimsError
from vims.tomlconfig import StrictModel, load_toml


class AvmConfigError(VimsError):
    """The A-VM configuration file is missing or invalid."""


class CvmConfig(StrictModel):
    """One guarded C-VM: where its memory is and what it should look like."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    memory: Path | None = None  # RAM file (lab) or snapshot
    domain: str | None = None  # live Xen/KVM domain through LibVMI
    profile: Path
    baseline: Path | None = None
    policy: Path | None = None  # local allowlists (modules, processes, creds)
    gdb: Path | None = None  # QEMU gdbstub socket: system-call tracing (behaviour.trace)


class AvmConfig(StrictModel):
    avm_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    rems: str = Field(pattern=r"^[0-9A-Za-z.\-]+:\d+$")  # control channel host:port
    rems_name: str = "rems"  # the REM-S certificate's hostname
    cert: Path
    key: Path
    ca: Path
    tpm_tcti: str = "device:/dev/tpmrm0"
    cvms: list[CvmConfig] = Field(min_length=1, max_length=64)
    reconnect_max_s: float = Field(default=5.0, gt=0, le=300)
    # Behaviour models (vims behaviour learn) the REM-S policy may name by digest.
    models_dir: Path | None = None
    # Checks this agent never runs, whatever the policy asks (a check that crashes on
    # some kernel, say). The REM-S still expects them: their C-VMs' verdicts lapse,
    # naming them, so switching a check off here is never silent.
    skip_checks: list[str] = Field(default_factory=list, max_length=64)


def load(path: Path) -> AvmConfig:
    return load_toml(path, AvmConfig, "avm", AvmConfigError)
