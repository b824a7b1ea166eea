"""REM-S configuration: a TOML file, validated strictly (unknown keys refused)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from vims.errors import VimsError
from vims.tomlconfig import StrictModel, load_toml


class ConfigError(VimsError):
    """The REM-S configuration file is missing or invalid."""


class TlsConfig(StrictModel):
    """The REM-S CA (issues A-VM client certificates) and the server's own certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


class Webhook(StrictModel):
    url: str = Field(pattern=r"^https?://")
    timeout_s: float = Field(default=2.0, gt=0, le=30)


class RemsConfig(StrictModel):
    database: str = "sqlite:////var/lib/vims/rems.db"
    http_listen: str = Field(default="127.0.0.1:8080", pattern=r"^[0-9A-Za-z.\-\[\]:]+:\d+$")
    channel_listen: str = Field(default="127.0.0.1:7443", pattern=r"^[0-9A-Za-z.\-\[\]:]+:\d+$")
    admin_token_file: Path
    signing_key: Path  # EC P-256 PEM; created on first start
    verdict_ttl_s: float = Field(default=30.0, gt=0, le=86400)
    tls: TlsConfig | None = None
    ek_ca_certs: list[Path] = Field(default_factory=list)
    golden_pcrs: dict[str, str] = Field(default_factory=dict)  # "17" -> hex (sha256 bank)
    webhooks: list[Webhook] = Field(default_factory=list)

    def admin_token(self) -> str:
        try:
            token = self.admin_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"admin token file {self.admin_token_file}: {exc.strerror}") from exc
        if len(token) < 16:
            raise ConfigError(f"admin token in {self.admin_token_file} is shorter than 16 chars")
        return token


def load(path: Path) -> RemsConfig:
    return load_toml(path, RemsConfig, "rems", ConfigError)
