"""REM-S configuration: a TOML file, validated strictly (unknown keys refused)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator, model_validator

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
    """A relying party told of revocations (a signed JWT, see vims.rems.webhooks)."""

    url: str = Field(pattern=r"^https?://")
    timeout_s: float = Field(default=2.0, gt=0, le=30)


LISTEN = r"^[0-9A-Za-z.\-\[\]:]+:\d+$"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: list[Network] = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


def listen_host(listen: str) -> str:
    return listen.rsplit(":", 1)[0].strip("[]")


class RemsConfig(StrictModel):
    database: str = "sqlite:////var/lib/vims/rems.db"
    # The HTTP API: TLS with the REM-S server certificate ([rems.tls]) unless http_tls
    # is false, which only a loopback address may be.
    http_listen: str = Field(default="127.0.0.1:8080", pattern=LISTEN)
    http_tls: bool = True
    # Plain HTTP for a gate on this host (nginx auth_request): loopback only.
    gate_listen: str | None = Field(default=None, pattern=LISTEN)
    channel_listen: str = Field(default="127.0.0.1:7443", pattern=LISTEN)
    admin_token_file: Path  # the operator's bootstrap token (scope operator)
    signing_key: Path  # EC P-256 PEM; created on first start
    verdict_ttl_s: float = Field(default=30.0, gt=0, le=86400)
    tls: TlsConfig | None = None
    ek_ca_certs: list[Path] = Field(default_factory=list)
    golden_pcrs: dict[str, str] = Field(default_factory=dict)  # "17" -> hex (sha256 bank)
    webhooks: list[Webhook] = Field(default_factory=list)
    webhook_queue_size: int = Field(default=1000, ge=1, le=100_000)  # per URL
    webhook_max_attempts: int = Field(default=5, ge=1, le=10)  # with backoff, then counted
    # Who may ask /v1/decision (the gate) and see the status page without a token.
    decision_allow: list[Network] = Field(default_factory=lambda: list(LOOPBACK))
    status_allow: list[Network] = Field(default_factory=lambda: list(LOOPBACK))
    # The EAR issuer (iss) and webhook issuer; default: the HTTP API's URL.
    issuer: str | None = Field(default=None, max_length=256)
    # Trust without golden PCR 17 and reference digests. Every decision, EAR and the
    # status page say so. Never in production.
    insecure_lab: bool = False
    # Untrusted clients cost bounded resources: connections per listener (keep their
    # sum under the process's open-file limit), and the seconds a request may take to
    # arrive whole. A TLS handshake must complete within handshake_timeout_s.
    http_max_connections: int = Field(default=1024, ge=1, le=100_000)
    gate_max_connections: int = Field(default=256, ge=1, le=100_000)
    channel_max_connections: int = Field(default=4096, ge=1, le=100_000)
    http_request_timeout_s: float = Field(default=10.0, gt=0, le=300)
    handshake_timeout_s: float = Field(default=10.0, gt=0, le=300)
    audit_checkpoint_s: float = Field(default=60.0, ge=1, le=86400)
    audit_checkpoint_file: Path | None = None

    @field_validator("golden_pcrs")
    @classmethod
    def _hex_pcrs(cls, value: dict[str, str]) -> dict[str, str]:
        for pcr, digest in value.items():
            if not pcr.isdigit() or not 0 <= int(pcr) <= 23:
                raise ValueError(f"PCR index {pcr!r} is not 0-23")
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                raise ValueError(f"PCR {pcr}: golden value must be 64 hex digits (sha256)")
        return {k: v.lower() for k, v in value.items()}

    @model_validator(mode="after")
    def _plain_only_on_loopback(self) -> RemsConfig:
        for name, listen, plain in (("gate_listen", self.gate_listen, True),
                                    ("http_listen", self.http_listen, not self.http_tls)):
            if listen is None or not plain:
                continue
            host = listen_host(listen)
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                raise ValueError(f"{name}: plain HTTP only on a loopback address, not {host}")
        if self.http_tls and self.tls is None:
            raise ValueError("http_tls needs [rems.tls] certificates (or http_tls = false "
                             "on a loopback http_listen)")
        return self

    @property
    def http_url(self) -> str:
        host = listen_host(self.http_listen)
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        port = self.http_listen.rsplit(":", 1)[1]
        return f"{'https' if self.http_tls else 'http'}://{host}:{port}"

    @property
    def ear_issuer(self) -> str:
        return self.issuer or self.http_url

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
