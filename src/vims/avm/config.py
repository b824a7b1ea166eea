"""A-VM agent configuration: a TOML file, validated strictly."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vims.errors import VimsError


class AvmConfigError(VimsError):
    """The A-VM configuration file is missing or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CvmConfig(_Strict):
    """One guarded C-VM: where its memory is and what it should look like."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    memory: Path | None = None  # RAM file (lab) or snapshot
    domain: str | None = None  # live Xen/KVM domain through LibVMI
    profile: Path
    baseline: Path | None = None
    policy: Path | None = None  # local allowlists (modules, processes, creds)


class AvmConfig(_Strict):
    avm_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    rems: str = Field(pattern=r"^[0-9A-Za-z.\-]+:\d+$")  # control channel host:port
    rems_name: str = "rems"  # the REM-S certificate's hostname
    cert: Path
    key: Path
    ca: Path
    tpm_tcti: str = "device:/dev/tpmrm0"
    cvms: list[CvmConfig] = Field(min_length=1, max_length=64)
    reconnect_max_s: float = Field(default=5.0, gt=0, le=300)


def load(path: Path) -> AvmConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AvmConfigError(f"config {path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AvmConfigError(f"config {path}: {exc}") from exc
    try:
        return AvmConfig.model_validate(data.get("avm", data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AvmConfigError(f"config {path}: {where}: {first['msg']}") from exc
