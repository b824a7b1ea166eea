"""Bad configuration files for the REM-S and the A-VM: one clear line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vims.avm.config import AvmConfigError
from vims.avm.config import load as load_avm
from vims.rems.config import ConfigError
from vims.rems.config import load as load_rems

REMS_OK = 'admin_token_file = "/t"\nsigning_key = "/k"\nhttp_tls = false\n'
TLS = '[rems.tls]\nca_cert = "/c"\nca_key = "/k"\nserver_cert = "/s"\nserver_key = "/sk"\n'
AVM_OK = ('avm_id = "avm1"\nrems = "127.0.0.1:7443"\ncert = "/c"\nkey = "/k"\nca = "/a"\n'
          '[[avm.cvms]]\nname = "cvm1"\nprofile = "/p"\n')


@pytest.mark.parametrize(("body", "needle"), [
    ("[rems]\n" + REMS_OK + "surprise = 1\n", "surprise: Extra inputs are not permitted"),
    ("[rems]\n" + REMS_OK + 'http_listen = "nowhere"\n', "http_listen"),
    ("[rems]\n" + REMS_OK + "verdict_ttl_s = -1\n", "verdict_ttl_s"),
    ("[rems\n", "Expected"),
    ("[rems]\nsigning_key = '/k'\n", "admin_token_file: Field required"),
    # Plain HTTP only on loopback; TLS needs certificates; golden values are sha256 hex.
    ("[rems]\n" + REMS_OK + 'http_listen = "0.0.0.0:8080"\n', "plain HTTP only on a loopback"),
    ("[rems]\n" + REMS_OK + 'gate_listen = "10.0.0.1:8081"\n', "gate_listen: plain HTTP only"),
    ("[rems]\n" + REMS_OK.replace("http_tls = false", "http_tls = true"), "needs \\[rems.tls\\]"),
    ("[rems]\n" + REMS_OK + 'golden_pcrs = { "17" = "abc" }\n', "64 hex digits"),
    ("[rems]\n" + REMS_OK + 'golden_pcrs = { "24" = "' + "a" * 64 + '" }\n', "not 0-23"),
])
def test_bad_rems_configs(tmp_path: Path, body: str, needle: str) -> None:
    cfg = tmp_path / "rems.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError, match=needle) as err:
        load_rems(cfg)
    assert "\n" not in str(err.value)
    assert str(cfg) in str(err.value)


def test_good_configs_load(tmp_path: Path) -> None:
    (tmp_path / "rems.toml").write_text("[rems]\n" + REMS_OK)
    assert load_rems(tmp_path / "rems.toml").verdict_ttl_s == 30.0
    tls = REMS_OK.replace("http_tls = false\n", 'http_listen = "0.0.0.0:8443"\n')
    (tmp_path / "rems.toml").write_text("[rems]\n" + tls + TLS)
    assert load_rems(tmp_path / "rems.toml").http_url == "https://127.0.0.1:8443"
    (tmp_path / "avm.toml").write_text("[avm]\n" + AVM_OK)
    assert load_avm(tmp_path / "avm.toml").cvms[0].name == "cvm1"


@pytest.mark.parametrize(("body", "needle"), [
    (AVM_OK.replace('avm_id = "avm1"', 'avm_id = "../evil"'), "avm_id"),
    (AVM_OK.replace('rems = "127.0.0.1:7443"', 'rems = "127.0.0.1"'), "rems"),
    (AVM_OK.split("[[avm.cvms]]", maxsplit=1)[0] + "cvms = []\n", "cvms"),
])
def test_bad_avm_configs(tmp_path: Path, body: str, needle: str) -> None:
    cfg = tmp_path / "avm.toml"
    cfg.write_text("[avm]\n" + body)
    with pytest.raises(AvmConfigError, match=needle):
        load_avm(cfg)


@pytest.mark.parametrize("args", [["rems", "serve"], ["avm", "run"], ["rems", "audit", "verify"]])
def test_cli_with_a_missing_config_is_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "vims.cli", *args, "--config",
                           str(tmp_path / "nope.toml")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"vims: error: config {tmp_path / 'nope.toml'} does not exist"]
