"""vims.tpm against real swtpm instances (no TPM mocks).

One manufactured swtpm (EK certificates from the REM-S-side EK CA) per module
serves most tests; a second one made by swtpm_localca (another "manufacturer")
provides a foreign AK and a foreign EK certificate. Tests that reset a TPM or
run tpm2-tools get their own swtpm, as swtpm without a resource manager has
only 3 transient object slots.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vims.tpm.attester import NV_EK_CERT_ECC, NV_EK_CERT_RSA2048, Attester
from vims.tpm.ekca import EkCa
from vims.tpm.eventlog import AGENT_PCR, EventLog, ReplayMismatch, replay
from vims.tpm.swtpm import LocalCa, Swtpm, manufacture_command
from vims.tpm.verifier import (
    BadSignature,
    CounterRegression,
    EkCertificateError,
    NonceMismatch,
    NotAQuote,
    PcrDigestMismatch,
    UnexpectedPcrSelection,
    WrongKey,
    make_credential,
    parse_attest,
    parse_public,
    qualified_name,
    validate_ek_certificate,
    verify_quote,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed"),
]

NONCE = bytes.fromhex("5eed0123456789abcdef")


@pytest.fixture(scope="module")
def tpm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tpm")


@pytest.fixture(scope="module")
def ca(tpm_dir: Path) -> EkCa:
    return EkCa.init(tpm_dir / "rems-ek-ca")[0]


@pytest.fixture(scope="module")
def tpm(tpm_dir: Path, ca: EkCa) -> Iterator[Swtpm]:
    t = Swtpm(tpm_dir / "state", ca)
    t.manufacture()
    with t:
        yield t
    assert not t.running


@pytest.fixture(scope="module")
def attester(tpm: Swtpm) -> Iterator[Attester]:
    with Attester(tpm.tcti) as a:
        a.create_ak()
        yield a


@pytest.fixture(scope="module")
def other_ca(tpm_dir: Path) -> LocalCa:
    return LocalCa(tpm_dir / "other-ca")


@pytest.fixture(scope="module")
def other_attester(tpm_dir: Path, other_ca: LocalCa) -> Iterator[Attester]:
    t = Swtpm(tpm_dir / "other-state", other_ca)
    t.manufacture()
    with t, Attester(t.tcti) as a:
        a.create_ak()
        yield a


def _verify(
    a: Attester, q_attest: bytes, q_sig: bytes, values: dict[int, bytes], **kw: object
) -> object:
    return verify_quote(a.ak_public_pem, q_attest, q_sig, NONCE, {"sha256": values}, **kw)  # type: ignore[arg-type]


# --- round trip ------------------------------------------------------------------


def test_ak_is_ecc_p256_restricted_signing_key_in_endorsement_hierarchy(
    attester: Attester,
) -> None:
    pub = parse_public(attester.ak_public_bytes)
    assert pub.name == attester.ak_name
    assert qualified_name(attester.ak_name) == attester.ak_qualified_name
    assert b"BEGIN PUBLIC KEY" in attester.ak_public_pem
    assert pub.object_attributes & 0x00010000  # restricted
    assert pub.object_attributes & 0x00040000  # sign


def test_quote_round_trip(attester: Attester) -> None:
    q = attester.quote(NONCE, [0, 17, AGENT_PCR])
    result = verify_quote(
        attester.ak_public_pem,
        q.attest,
        q.signature,
        NONCE,
        {"sha256": q.pcr_values},
        expected_pcrs=[0, 17, AGENT_PCR],
        ak_qualified_name=attester.ak_qualified_name,
    )
    assert result.attest.qualified_signer == attester.ak_qualified_name
    assert set(result.pcrs["sha256"]) == {0, 17, AGENT_PCR}


def test_quote_of_more_than_eight_pcrs(attester: Attester) -> None:
    pcrs = list(range(24))
    q = attester.quote(NONCE, pcrs)
    assert sorted(q.pcr_values) == pcrs
    verify_quote(
        attester.ak_public_pem, q.attest, q.signature, NONCE, {"sha256": q.pcr_values}, pcrs
    )


# --- one test per rejection reason with real quotes ----------------------------------


def test_tampered_attest_is_bad_signature(attester: Attester) -> None:
    q = attester.quote(NONCE, [0])
    bad = bytearray(q.attest)
    bad[-1] ^= 1  # inside pcrDigest: still parses
    with pytest.raises(BadSignature) as exc:
        verify_quote(
            attester.ak_public_pem, bytes(bad), q.signature, NONCE, {"sha256": q.pcr_values}
        )
    assert exc.value.reason == "bad-signature"


def test_other_nonce_is_replay(attester: Attester) -> None:
    q = attester.quote(b"old nonce", [0])
    with pytest.raises(NonceMismatch) as exc:
        _verify(attester, q.attest, q.signature, q.pcr_values)
    assert exc.value.reason == "nonce-mismatch"


def test_other_pcr_values_are_digest_mismatch(attester: Attester) -> None:
    q = attester.quote(NONCE, [0, 17])
    forged = {**q.pcr_values, 17: hashlib.sha256(b"forged").digest()}
    with pytest.raises(PcrDigestMismatch):
        _verify(attester, q.attest, q.signature, forged)


def test_unexpected_selection(attester: Attester) -> None:
    q = attester.quote(NONCE, [0])
    with pytest.raises(UnexpectedPcrSelection):
        _verify(attester, q.attest, q.signature, q.pcr_values, expected_pcrs=[0, 17])


def test_quote_from_another_tpm_is_wrong_key(attester: Attester, other_attester: Attester) -> None:
    q = other_attester.quote(NONCE, [0])
    with pytest.raises(WrongKey) as exc:
        _verify(
            attester, q.attest, q.signature, q.pcr_values,
            ak_qualified_name=attester.ak_qualified_name,
        )  # fmt: skip
    assert exc.value.reason == "wrong-key"
    # Without the AK's qualified name it can only be reported as a bad signature.
    with pytest.raises(BadSignature):
        _verify(attester, q.attest, q.signature, q.pcr_values)


def test_certify_attest_is_not_a_quote(attester: Attester) -> None:
    attest, sig = attester.certify_ak(NONCE)
    with pytest.raises(NotAQuote) as exc:
        _verify(attester, attest, sig, {})
    assert exc.value.reason == "not-a-quote"


def test_restart_is_counter_regression(tmp_path: Path) -> None:
    with Swtpm(tmp_path / "state") as t:
        a = Attester(t.tcti)
        first = a.quote(NONCE, [0])
        before = parse_attest(first.attest).clock_info
        pem, qn = a.ak_public_pem, a.ak_qualified_name
        a.close()
        t.reinit()  # CMD_INIT: a TPM reset, as at a reboot
        from tpm2_pytss.constants import TPM2_SU

        with Attester(t.tcti) as b:
            b.esapi.startup(TPM2_SU.CLEAR)
            second = b.quote(NONCE, [0])
            assert b.ak_public_pem == pem  # primary AK: same key after the reset
        after = parse_attest(second.attest).clock_info
        assert after.reset_count > before.reset_count
        verify_quote(pem, second.attest, second.signature, NONCE, {"sha256": second.pcr_values})
        with pytest.raises(CounterRegression) as exc:
            verify_quote(
                pem, second.attest, second.signature, NONCE, {"sha256": second.pcr_values},
                previous_clock=before, ak_qualified_name=qn,
            )  # fmt: skip
        assert exc.value.reason == "counter-regression"
        # Same boot: a later quote passes the counter check.
        assert after.clock >= 0


# --- tpm2-tools interoperability and the CLI ------------------------------------------


def _tool(cmd: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd[0]}: {proc.stderr}"
    # No resource manager in front of swtpm: free the transient slots after each tool.
    subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True, capture_output=True)
    return proc.stdout


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from vims.tpm.cli import tpm; sys.exit(tpm.main(standalone_mode=True))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )


@pytest.mark.skipif(shutil.which("tpm2_quote") is None, reason="tpm2-tools not installed")
def test_tpm2_tools_quote_accepted_by_cli(tmp_path: Path) -> None:
    with Swtpm(tmp_path / "state") as t:
        env = {**os.environ, "TPM2TOOLS_TCTI": t.tcti, "TSS2_LOG": "all+none"}
        _tool(["tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"], env, tmp_path)
        _tool(
            ["tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256",
             "-s", "ecdsa", "-u", "ak.pem", "-f", "pem", "-n", "ak.name"],
            env, tmp_path,
        )  # fmt: skip
        out = _tool(
            ["tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,17", "-q", NONCE.hex(),
             "-m", "attest.bin", "-s", "sig.bin", "-o", "pcrs.out", "-g", "sha256"],
            env, tmp_path,
        )  # fmt: skip
    # tpm2_quote -o writes a binary TPML; its YAML on stdout lists the values.
    values = dict(re.findall(r"^\s+(\d+)\s*:\s*0x([0-9A-Fa-f]{64})$", out, re.M))
    assert set(values) == {"0", "17"}
    (tmp_path / "pcrs.json").write_text(json.dumps({"sha256": values}))
    args = ["verify-quote", "--ak", str(tmp_path / "ak.pem"), "--quote",
            str(tmp_path / "attest.bin"), "--signature", str(tmp_path / "sig.bin"),
            "--pcrs", str(tmp_path / "pcrs.json")]  # fmt: skip
    ok = _cli(*args, "--nonce", NONCE.hex(), "--format", "json", "--expect-pcrs", "0,17")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["valid"] is True
    bad = _cli(*args, "--nonce", "00" + NONCE.hex())
    assert bad.returncode == 1
    assert bad.stderr.startswith("vims: quote rejected: nonce-mismatch: ")
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = _cli(*args[:-1], str(tmp_path / "nope.json"), "--nonce", NONCE.hex())
    assert missing.returncode == 2
    assert missing.stderr.startswith("vims: error: ")


# --- EK certificates and credential activation ------------------------------------------


def test_ek_certificates_chain_to_our_ca(attester: Attester, ca: EkCa) -> None:
    cas = [p.read_bytes() for p in ca.ca_cert_paths]
    for index in (NV_EK_CERT_RSA2048, NV_EK_CERT_ECC):
        cert = validate_ek_certificate(attester.ek_certificate(index), cas)
        assert cert.subject is not None


def test_ek_certificate_from_other_ca_is_rejected(
    other_attester: Attester, ca: EkCa, other_ca: LocalCa
) -> None:
    cert = other_attester.ek_certificate()
    validate_ek_certificate(cert, [p.read_bytes() for p in other_ca.ca_cert_paths])
    with pytest.raises(EkCertificateError) as exc:
        validate_ek_certificate(cert, [p.read_bytes() for p in ca.ca_cert_paths])
    assert exc.value.reason == "ek-certificate-invalid"


def test_make_credential_activate_credential_round_trip(attester: Attester) -> None:
    ek = parse_public(attester.ek_public())
    secret = os.urandom(32)
    blob, enc = make_credential(ek, attester.ak_name, secret)
    assert attester.activate_credential(blob, enc) == secret
    # Also from the bare RSA key (as taken from the EK certificate).
    blob, enc = make_credential(ek.key, attester.ak_name, b"short")
    assert attester.activate_credential(blob, enc) == b"short"


def test_make_credential_with_ecc_p384_ek(attester: Attester) -> None:
    ek = parse_public(attester.ecc_ek_public())
    assert (ek.name_alg, ek.sym_key_bits) == (0x000C, 256)  # SHA-384, AES-256
    blob, enc = make_credential(ek, attester.ak_name, b"ecc secret")
    assert attester.activate_credential(blob, enc, ek="ecc") == b"ecc secret"


def test_credential_for_another_name_fails(attester: Attester, other_attester: Attester) -> None:
    from tpm2_pytss import TSS2_Exception

    ek = parse_public(attester.ek_public())
    blob, enc = make_credential(ek, other_attester.ak_name, b"secret")
    with pytest.raises(TSS2_Exception):
        attester.activate_credential(blob, enc)


# --- DRTM and event log ---------------------------------------------------------------


def test_drtm_pcr17_formula(tmp_path: Path) -> None:
    data = b"tboot MLE: xen.gz + dom0 kernel"
    with Swtpm(tmp_path / "state") as t:
        expected = t.drtm_measure(data)
        assert expected == hashlib.sha256(b"\0" * 32 + hashlib.sha256(data).digest()).digest()
        with Attester(t.tcti) as a:
            assert a.pcr_values([17])[17] == expected


def test_event_log_replays_to_quoted_pcr(attester: Attester) -> None:
    attester.pcr_reset(AGENT_PCR)
    log = EventLog()
    for kind, blob in [("code", b"agent.py"), ("config", b"cfg"), ("policy", b"pol")]:
        attester.extend(AGENT_PCR, log.add(blob, kind, f"{kind}-v1"))
    q = attester.quote(NONCE, [AGENT_PCR])
    quoted = _verify(attester, q.attest, q.signature, q.pcr_values)
    pcrs = quoted.pcrs["sha256"]  # type: ignore[attr-defined]
    golden = {e.description: e.digest for e in log.entries}
    replay(EventLog.from_json(log.to_json()), pcrs, golden)
    # A log that hides one measurement no longer matches the TPM.
    tampered = EventLog(log.entries[:-1])
    with pytest.raises(ReplayMismatch):
        replay(tampered, pcrs)


def test_platform_certificate_is_not_an_ek_certificate(
    other_attester: Attester, other_ca: LocalCa
) -> None:
    """swtpm_localca's platform certificate certifies the EK's own key (EKU 2.23.133.8.2).

    Presented as the EK certificate it names the right key and chains to the
    right CA: only the EK profile checks (EKU, TPM attributes) tell it apart.
    """
    platform = other_attester.ek_certificate(0x01C08000)
    with pytest.raises(EkCertificateError) as exc:
        validate_ek_certificate(platform, [p.read_bytes() for p in other_ca.ca_cert_paths])
    assert "tpmManufacturer" in exc.value.detail or "EKCertificate" in exc.value.detail


# --- manufacturing across hosts: the CLI of the roles --------------------------------------


def _vims(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vims.cli", *args], capture_output=True,
                          text=True, check=False, timeout=120)


def test_manufacture_with_the_rems_ek_ca_via_cli(tmp_path: Path) -> None:
    """(a) EKs without certificates, (b) EK public, (c) REM-S issues, (d) NV install.

    The A-VM side never sees a CA key; run twice, nothing changes.
    """
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(manufacture_command(state), check=True, capture_output=True)
    ca_dir = tmp_path / "rems-ek-ca"
    init = _vims("tpm", "ek-ca", "init", "--dir", str(ca_dir), "--format", "json")
    assert init.returncode == 0, init.stderr
    trusted = [Path(p).read_bytes() for p in json.loads(init.stdout)["ek_ca_certs"]]
    with Swtpm(state) as t:
        with Attester(t.tcti) as a:
            from tpm2_pytss import TSS2_Exception

            with pytest.raises(TSS2_Exception):  # (a) made no certificate
                a.ek_certificate()
        for run in (1, 2):
            pub = _vims("tpm", "ek-public", "--tcti", t.tcti, "--out", str(tmp_path / "ek.json"))
            assert pub.returncode == 0, pub.stderr
            issue = _vims("tpm", "ek-ca", "issue", "--dir", str(ca_dir), "--ek-public",
                          str(tmp_path / "ek.json"), "--out", str(tmp_path / "ek.pem"),
                          "--format", "json")
            assert issue.returncode == 0, issue.stderr
            install = _vims("tpm", "ek-cert", "install", "--tcti", t.tcti, "--cert",
                            str(tmp_path / "ek.pem"), "--format", "json")
            assert install.returncode == 0, install.stderr
            assert json.loads(issue.stdout)["changed"] is (run == 1)
            assert json.loads(install.stdout) == {"changed": run == 1, "nv_index": "0x01c00002"}
        assert not list(state.glob("*.key"))
        assert not list(state.glob("*.pem"))
        with Attester(t.tcti) as a:
            # What enrollment reads (Attester.ek_certificate) is what was written.
            cert = validate_ek_certificate(a.ek_certificate(), trusted)
            assert cert.public_key() == parse_public(a.ek_public()).key
        # Another TPM's certificate is refused before anything is written.
        other, _ = EkCa.init(tmp_path / "other-ca")
        from cryptography.hazmat.primitives import serialization

        foreign = other.build(parse_public(_any_rsa_ek_public(tmp_path)))
        (tmp_path / "foreign.pem").write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
        bad = _vims("tpm", "ek-cert", "install", "--tcti", t.tcti, "--cert",
                    str(tmp_path / "foreign.pem"))
        assert bad.returncode == 2
        assert bad.stderr.startswith("vims: error: ")
        assert "another key" in bad.stderr


def _any_rsa_ek_public(tmp_path: Path) -> bytes:
    state = tmp_path / "another-tpm"
    state.mkdir()
    subprocess.run(manufacture_command(state), check=True, capture_output=True)
    with Swtpm(state) as t, Attester(t.tcti) as a:
        return a.ek_public()


# --- the control channel is root's only ----------------------------------------------------

_AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv")
def test_control_and_data_sockets_refuse_other_users(tmp_path: Path) -> None:
    """A local user who reached swtpm's control channel could fake the DRTM launch."""
    import stat
    import tempfile

    run = Path(tempfile.mkdtemp(prefix="vims-sock-"))  # short path, and traversable:
    run.chmod(0o755)  # the sockets' own mode must refuse, not only their directory
    try:
        with Swtpm(tmp_path / "state", socket_dir=run) as t:
            for sock in (t.ctrl_socket, t.data_socket):
                assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            forged = subprocess.run(
                [*_AS_NOBODY, "swtpm_ioctl", "--unix", str(t.ctrl_socket), "-h", "forged launch"],
                capture_output=True, text=True, check=False)
            assert forged.returncode != 0
            assert "Permission denied" in forged.stderr or "denied" in forged.stderr.lower()
            env = {**os.environ, "TPM2TOOLS_TCTI": t.tcti, "TSS2_LOG": "all+none"}
            tpm_use = subprocess.run([*_AS_NOBODY, "tpm2_getrandom", "8"], env=env,
                                     capture_output=True, check=False)
            assert tpm_use.returncode != 0
            # root still measures the launch, and the TPM shows it.
            expected = t.drtm_measure(b"vims lab measured launch")
            with Attester(t.tcti) as a:
                assert a.pcr_values([17])[17] == expected
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_several_clients_share_one_swtpm(tpm: Swtpm, attester: Attester) -> None:
    """swtpm serves one connection at a time: the relay must not hold one open."""
    with Attester(tpm.tcti) as second:
        assert second.pcr_values([0]) == attester.pcr_values([0])
        q = attester.quote(NONCE, [0])
        assert second.pcr_values([0])[0] == q.pcr_values[0]


# --- what swtpm 0.7.1 reports in quotes across restarts (pins the counter rules' input) ---


def _clock(t: Swtpm, startup: bool = False, shutdown: bool = False,
           failed_tries: int | None = None) -> tuple[int, int, int, bool]:
    from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPM2_PT, TPM2_SU

    with Attester(t.tcti) as a:
        if startup:
            a.esapi.startup(TPM2_SU.CLEAR)
        if failed_tries is not None:
            _, cap = a.esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
            assert int(cap.data.tpmProperties[0].value) == failed_tries
            # The AK has no noDA: three unorderly restarts would lock it out (maxTries 3).
            a.esapi.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)
        ci = parse_attest(a.quote(NONCE, [0]).attest).clock_info
        if shutdown:
            a.esapi.shutdown(TPM2_SU.CLEAR)
    return ci.clock, ci.reset_count, ci.restart_count, ci.safe


def test_swtpm_clock_and_counters_across_restarts(tmp_path: Path) -> None:
    """resetCount/restartCount only go up; clock and safe do not behave so simply.

    Without TPM2_Shutdown first (SIGTERM, kill -9, CMD_INIT), swtpm restarts
    its clock from the last value saved in NV - it goes back - and reports
    safe = 0; after an orderly Shutdown the clock carries on and safe stays 1.
    Each DRTM hash sequence counts as a TPM restart. Each unorderly restart
    also counts as a dictionary-attack failure (failedTries + 1, maxTries 3).
    """
    t = Swtpm(tmp_path / "state")
    with t:
        c0, reset0, restart0, safe0 = _clock(t)
        assert (reset0, restart0, safe0) == (1, 0, True)
        t.drtm_measure(b"launch")
        c1, reset1, restart1, _ = _clock(t)
        assert (reset1, restart1) == (1, 1)
        assert c1 >= c0
        t.reinit()
        c2, reset2, restart2, safe2 = _clock(t, startup=True, failed_tries=1)
        assert (reset2, restart2, safe2) == (2, 0, False)
        assert c2 < c1  # the clock went back: not saved in NV since the start
        t.stop(orderly=False)  # SIGTERM: swtpm saves its state, but no TPM2_Shutdown sent
        t.start()
        _, reset3, _, safe3 = _clock(t, failed_tries=1)
        assert (reset3, safe3) == (3, False)
        t.kill()
        t.start()
        _, reset4, _, safe4 = _clock(t, shutdown=True, failed_tries=1)
        assert (reset4, safe4) == (4, False)
        t.stop()  # Swtpm.stop sends TPM2_Shutdown(CLEAR) first
        t.start()
        _, reset5, restart5, _ = _clock(t, failed_tries=0)
        assert (reset5, restart5) == (5, 0)
