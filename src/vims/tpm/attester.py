"""A-VM side of remote attestation: EK, AK, quotes and credential activation (tpm2-pytss).

The TCTI is configurable so the same code drives a swtpm on its root-only UNIX
socket (``cmd:python -I -m vims.tpm.relay SOCKET``, see :mod:`vims.tpm.relay`)
and the kernel resource manager in a real A-VM (``device:/dev/tpmrm0``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from types import TracebackType

# ESYS logs every failed command to stderr; tests provoke failures on purpose.
os.environ.setdefault("TSS2_LOG", "all+none")

from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception  # type: ignore[import-untyped]
from tpm2_pytss.constants import (  # type: ignore[import-untyped]
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_PT,
    TPM2_SE,
    TPMA_NV,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (  # type: ignore[import-untyped]
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_NV_PUBLIC,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)

from vims.errors import VimsError

#: NV indices of EK certificates (TCG EK Credential Profile): RSA-2048 at
#: 0x1c00002, and swtpm's ECC P-384 EK at 0x1c00016 (the index the profile
#: assigns to the high-range ECC P-384 template H-4). swtpm_setup writes there,
#: and so does :meth:`Attester.install_ek_certificate` with a REM-S-issued one.
NV_EK_CERT_RSA2048 = 0x01C00002
NV_EK_CERT_ECC = 0x01C00016
#: Persistent handles where swtpm_setup leaves the EKs it certified.
EK_HANDLE_RSA = 0x81010001
EK_HANDLE_ECC = 0x81010016

#: PCR the A-VM agent extends its own measurements into (see vims.tpm.eventlog).
from vims.tpm.eventlog import AGENT_PCR  # noqa: E402 - re-exported

_AK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
# TCG EK Credential Profile template L-1 (RSA-2048, AES-128-CFB) policy:
# PolicySecret(TPM_RH_ENDORSEMENT).
_EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")


#: NV attributes of an EK certificate index, as TPM manufacturers (and swtpm_setup)
#: define it: created and written under platform authorisation, readable by anyone,
#: and WRITEDEFINE so that, once write-locked, it stays read-only until undefined.
_EK_CERT_NV_ATTRS = (
    TPMA_NV.PLATFORMCREATE
    | TPMA_NV.PPWRITE
    | TPMA_NV.WRITEDEFINE
    | TPMA_NV.PPREAD
    | TPMA_NV.OWNERREAD
    | TPMA_NV.AUTHREAD
    | TPMA_NV.NO_DA
)
_NV_CHUNK = 1024  # below every TPM's TPM2_PT_NV_BUFFER_MAX


class AttesterError(VimsError):
    """The TPM refused an attester operation."""


@dataclass(frozen=True)
class Quote:
    """A TPM2_Quote as sent to the REM-S."""

    attest: bytes  #: TPMS_ATTEST exactly as signed
    signature: bytes  #: marshalled TPMT_SIGNATURE
    pcr_values: dict[int, bytes]  #: sha256 bank, read right after the quote


def _ek_template_rsa() -> TPM2B_PUBLIC:
    """EK template L-1 (the one swtpm_setup certifies at 0x81010001)."""
    pub = TPM2B_PUBLIC.parse(
        "rsa2048:aes128cfb",
        objectAttributes=TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.ADMINWITHPOLICY
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT,
        authPolicy=_EK_POLICY,
    )
    pub.publicArea.unique.rsa = b"\0" * 256
    return pub


class Attester:
    """EK, AK and quotes of one TPM.

    The AK is an ECC P-256 restricted signing *primary* key in the endorsement
    hierarchy: deterministic for a given TPM (same AK after an agent restart),
    and quotes signed by endorsement-hierarchy keys carry resetCount and
    restartCount in clear (owner-hierarchy keys get them obfuscated), which
    the REM-S needs to detect reboots.
    """

    def __init__(self, tcti: str) -> None:
        name, _, conf = tcti.partition(":")
        self._tcti = TCTILdr(name, conf or None)
        self.esapi = ESAPI(self._tcti)
        self._ak: ESYS_TR | None = None
        self._ak_public: TPM2B_PUBLIC | None = None
        self._ek: ESYS_TR | None = None
        self._ek_persistent = False
        self._ecc_ek_handle: ESYS_TR | None = None

    # --- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Flush the transient AK/EK and release the TCTI.

        Without a resource manager (swtpm) transient objects outlive the
        connection and swtpm has only 3 slots, so leaking them breaks the next
        user of the TPM.
        """
        transient = [self._ak] + ([] if self._ek_persistent else [self._ek])
        for handle in transient:
            if handle is not None:
                # Best effort: after a TPM reset the handle is already gone.
                with contextlib.suppress(Exception):
                    self.esapi.flush_context(handle)
        self._ak = self._ek = None
        self.esapi.close()

    def __enter__(self) -> Attester:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- EK ----------------------------------------------------------------------

    def ek_certificate(self, nv_index: int = NV_EK_CERT_RSA2048) -> bytes:
        """Read the DER EK certificate from NV (read in chunks: NV buffers are ~1-2 kB)."""
        handle = self.esapi.tr_from_tpmpublic(nv_index)
        nv_pub, _ = self.esapi.nv_read_public(handle)
        size = int(nv_pub.nvPublic.dataSize)
        out = b""
        while len(out) < size:
            chunk = min(1024, size - len(out))
            out += bytes(self.esapi.nv_read(handle, chunk, len(out), auth_handle=handle))
        self.esapi.tr_close(handle)
        return out

    def _nv_handle(self, nv_index: int) -> ESYS_TR | None:
        try:
            return self.esapi.tr_from_tpmpublic(nv_index)
        except TSS2_Exception:
            return None  # no such index

    def install_ek_certificate(self, cert_der: bytes, nv_index: int = NV_EK_CERT_RSA2048) -> bool:
        """Write an EK certificate into NV as a TPM manufacturer does; ``True`` if it changed.

        Needs platform authorisation (empty on swtpm, which has no firmware to
        take the platform hierarchy). An index already holding this certificate
        is left alone; one holding another certificate is undefined and
        recreated (a re-issued certificate). The index is write-locked after
        writing, so nothing short of the platform hierarchy replaces it.
        """
        handle = self._nv_handle(nv_index)
        if handle is not None:
            if self.ek_certificate(nv_index) == cert_der:
                return False
            handle = self.esapi.tr_from_tpmpublic(nv_index)
            self.esapi.nv_undefine_space(handle, auth_handle=ESYS_TR.RH_PLATFORM)
        public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
            nvIndex=nv_index, nameAlg=TPM2_ALG.SHA256, attributes=_EK_CERT_NV_ATTRS,
            dataSize=len(cert_der)))
        try:
            handle = self.esapi.nv_define_space(None, public, auth_handle=ESYS_TR.RH_PLATFORM)
            for offset in range(0, len(cert_der), _NV_CHUNK):
                self.esapi.nv_write(handle, cert_der[offset : offset + _NV_CHUNK], offset,
                                    auth_handle=ESYS_TR.RH_PLATFORM)
            self.esapi.nv_write_lock(handle, auth_handle=ESYS_TR.RH_PLATFORM)
        except TSS2_Exception as exc:
            raise AttesterError(
                f"writing the EK certificate at NV 0x{nv_index:08x}: {exc}"
            ) from exc
        self.esapi.tr_close(handle)
        return True

    def tpm_info(self) -> dict[str, object]:
        """The TPM's manufacturer, model, firmware and specification (for its EK certificate).

        Formatted as the TCG EK Credential Profile wants them in the certificate:
        ``id:%08X`` for the manufacturer and the firmware version, the vendor
        strings for the model.
        """
        _, cap = self.esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.FAMILY_INDICATOR, 32)
        props = {int(p.property): int(p.value) for p in cap.data.tpmProperties}
        fixed = int(TPM2_PT.FAMILY_INDICATOR)
        vendor = b"".join(props.get(fixed + i, 0).to_bytes(4, "big") for i in range(6, 10))
        return {
            "manufacturer": f"id:{props.get(int(TPM2_PT.MANUFACTURER), 0):08X}",
            "model": vendor.rstrip(b"\0").decode("ascii", "replace") or "unknown",
            "version": f"id:{props.get(fixed + 11, 0):08X}",  # TPM2_PT_FIRMWARE_VERSION_1
            "spec_family": props.get(fixed, 0).to_bytes(4, "big").rstrip(b"\0").decode(
                "ascii", "replace"),
            "spec_level": props.get(int(TPM2_PT.LEVEL), 0),
            "spec_revision": props.get(int(TPM2_PT.REVISION), 0),
        }

    def ek(self) -> ESYS_TR:
        """The RSA EK: the persistent one swtpm_setup made, else created from template L-1."""
        if self._ek is None:
            try:
                self._ek = self.esapi.tr_from_tpmpublic(EK_HANDLE_RSA)
                self._ek_persistent = True
            except TSS2_Exception:  # not provisioned: recreate it, same key (same template)
                self._ek = self.esapi.create_primary(None, _ek_template_rsa(), ESYS_TR.ENDORSEMENT)[
                    0
                ]
        return self._ek

    def ek_public(self) -> bytes:
        """The EK's TPM2B_PUBLIC (for :func:`vims.tpm.verifier.parse_public`)."""
        pub, _, _ = self.esapi.read_public(self.ek())
        return bytes(pub.marshal())

    # --- AK ----------------------------------------------------------------------

    def create_ak(self) -> None:
        """Create (or re-derive) the AK: ``ecc256:ecdsa-sha256:null`` under ENDORSEMENT.

        ``:null`` matters: without it the restricted key gets a symmetric
        algorithm and creation fails with TPM_RC_SYMMETRIC.
        """
        if self._ak is not None:
            return
        template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=_AK_ATTRS)
        handle, pub, _, _, _ = self.esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        self._ak, self._ak_public = handle, pub

    def _ak_handle(self) -> ESYS_TR:
        self.create_ak()
        assert self._ak is not None
        return self._ak

    @property
    def ak_public(self) -> TPM2B_PUBLIC:
        self.create_ak()
        assert self._ak_public is not None
        return self._ak_public

    @property
    def ak_public_pem(self) -> bytes:
        return bytes(self.ak_public.to_pem())

    @property
    def ak_public_bytes(self) -> bytes:
        """Marshalled TPM2B_PUBLIC of the AK."""
        return bytes(self.ak_public.marshal())

    @property
    def ak_name(self) -> bytes:
        """TPM name of the AK (nameAlg || SHA256(TPMT_PUBLIC))."""
        return bytes(self.ak_public.get_name().marshal())[2:]

    @property
    def ak_qualified_name(self) -> bytes:
        """Qualified name of the AK: what a quote's qualifiedSigner holds."""
        _, _, qn = self.esapi.read_public(self._ak_handle())
        return bytes(qn.marshal())[2:]

    # --- PCRs and quotes -----------------------------------------------------------

    def pcr_values(self, pcrs: list[int]) -> dict[int, bytes]:
        """Read sha256 PCRs; pcr_read returns at most 8 digests per call, so loop."""
        out: dict[int, bytes] = {}
        todo = sorted(set(pcrs))
        while todo:
            sel = TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, todo)))
            _, got_sel, digests = self.esapi.pcr_read(sel)
            got = [
                byte_i * 8 + bit
                for s in got_sel
                for byte_i, b in enumerate(bytes(s.pcrSelect)[: s.sizeofSelect])
                for bit in range(8)
                if b >> bit & 1
            ]
            if not got:
                raise AttesterError(f"TPM returned no PCR values for {todo}")
            for i, d in zip(got, digests, strict=True):
                out[i] = bytes(d)
            todo = [i for i in todo if i not in out]
        return out

    def quote(self, qualifying_data: bytes, pcrs: list[int]) -> Quote:
        """TPM2_Quote over the sha256 bank with the AK, plus the PCR values.

        The values are read after the quote; if a PCR is extended in between,
        the REM-S sees a digest mismatch and asks again.
        """
        sel = TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, sorted(set(pcrs)))))
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        quoted, sig = self.esapi.quote(self._ak_handle(), sel, qualifying_data, scheme)
        return Quote(bytes(quoted), bytes(sig.marshal()), self.pcr_values(pcrs))

    def certify_ak(self, qualifying_data: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify of the AK by itself: a TPMS_ATTEST that is *not* a quote."""
        ak = self._ak_handle()
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        attest, sig = self.esapi.certify(ak, ak, qualifying_data, scheme)
        return bytes(attest), bytes(sig.marshal())

    def extend(self, pcr: int, digest: bytes) -> None:
        """Extend a sha256 PCR with a 32-byte digest."""
        if len(digest) != 32:
            raise AttesterError(f"sha256 digest must be 32 bytes, got {len(digest)}")
        ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        ha.digest.sha256 = digest
        vals = TPML_DIGEST_VALUES([ha])
        self.esapi.pcr_extend(ESYS_TR.parse(f"PCR{pcr}"), vals)

    def measure(self, pcr: int, data: bytes) -> bytes:
        """Extend SHA256(data) into ``pcr``; return the digest for the event log."""
        digest = hashlib.sha256(data).digest()
        self.extend(pcr, digest)
        return digest

    def pcr_reset(self, pcr: int) -> None:
        """Reset a PCR resettable at locality 0 (16 or 23)."""
        self.esapi.pcr_reset(ESYS_TR.parse(f"PCR{pcr}"))

    # --- credential activation -------------------------------------------------------

    def _ecc_ek(self) -> ESYS_TR:
        """The P-384 EK swtpm_setup persists at 0x81010016 (no transient fallback)."""
        if self._ecc_ek_handle is None:
            self._ecc_ek_handle = self.esapi.tr_from_tpmpublic(EK_HANDLE_ECC)
        return self._ecc_ek_handle

    def ecc_ek_public(self) -> bytes:
        """TPM2B_PUBLIC of the ECC EK (SHA-384 name, AES-256: see make_credential)."""
        pub, _, _ = self.esapi.read_public(self._ecc_ek())
        return bytes(pub.marshal())

    def activate_credential(
        self, credential_blob: bytes, encrypted_secret: bytes, ek: str = "rsa"
    ) -> bytes:
        """TPM2_ActivateCredential with the AK and the ``rsa`` or ``ecc`` EK; return the secret.

        The RSA EK (template L-1) allows use only under
        PolicySecret(TPM_RH_ENDORSEMENT), hence the policy session. swtpm's
        P-384 EK has userWithAuth set, so its (empty) password authorises it.
        """
        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        ak = self._ak_handle()
        ek_handle = self._ecc_ek() if ek == "ecc" else self.ek()
        pub, _, _ = self.esapi.read_public(ek_handle)
        if pub.publicArea.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
            out = self.esapi.activate_credential(
                ak, ek_handle, blob, secret, session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD
            )
            return bytes(out)
        session = self.esapi.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            pub.publicArea.nameAlg,
        )
        try:
            self.esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
            out = self.esapi.activate_credential(
                ak, ek_handle, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
            )
        finally:
            self.esapi.flush_context(session)
        return bytes(out)


__all__ = [
    "AGENT_PCR",
    "EK_HANDLE_ECC",
    "EK_HANDLE_RSA",
    "NV_EK_CERT_ECC",
    "NV_EK_CERT_RSA2048",
    "Attester",
    "AttesterError",
    "Quote",
]
