"""Offline verification of TPM 2.0 evidence for the REM-S (pure Python).

The REM-S must not trust anything an A-VM sends until it has checked it, and it
must not need the TSS libraries to do so: this module parses the TPM structures
with a bounds-checked cursor (struct + ``cryptography`` only, no tpm2-pytss).

Order of checks in :func:`verify_quote` (STYLE.md, "Verifying evidence"):

1. parse the TPMT_SIGNATURE and reject unsupported algorithms before any crypto;
2. parse the TPMS_ATTEST structurally (magic, type, every byte consumed) - a
   cheap, bounded step that gives precise reasons, no field is trusted yet;
3. verify the signature over the exact attest bytes;
4. the nonce (extraData), compared in constant time;
5. the PCR selection, 6. the PCR digest, 7. the clock counters.

Every rejection is a :class:`QuoteError` subclass with a stable ``reason`` code
that reports, logs and the CLI use.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

# --- TPM constants (TPM 2.0 Part 2) -------------------------------------------

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ST_ATTEST_CERTIFY = 0x8017

TPM_ALG_RSA = 0x0001
TPM_ALG_SHA1 = 0x0004
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D
TPM_ALG_NULL = 0x0010
TPM_ALG_RSASSA = 0x0014
TPM_ALG_RSAES = 0x0015
TPM_ALG_RSAPSS = 0x0016
TPM_ALG_OAEP = 0x0017
TPM_ALG_ECDSA = 0x0018
TPM_ALG_ECDAA = 0x001A
TPM_ALG_ECC = 0x0023

# TPMA_OBJECT bits (Part 2 §8.3).
TPMA_OBJECT_FIXEDTPM = 0x00000002
TPMA_OBJECT_FIXEDPARENT = 0x00000010
TPMA_OBJECT_SENSITIVEDATAORIGIN = 0x00000020
TPMA_OBJECT_RESTRICTED = 0x00010000
TPMA_OBJECT_DECRYPT = 0x00020000
TPMA_OBJECT_SIGN_ENCRYPT = 0x00040000

TPM_ECC_NIST_P256 = 0x0003
TPM_ECC_NIST_P384 = 0x0004

#: PCR bank names as used in the JSON evidence and the tpm2-tools YAML.
BANKS: dict[str, int] = {
    "sha1": TPM_ALG_SHA1,
    "sha256": TPM_ALG_SHA256,
    "sha384": TPM_ALG_SHA384,
    "sha512": TPM_ALG_SHA512,
}
_BANK_NAMES = {v: k for k, v in BANKS.items()}

# Hash algorithms a quote signature may use. SHA-1 is deliberately absent.
_SIG_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    TPM_ALG_SHA256: hashes.SHA256,
    TPM_ALG_SHA384: hashes.SHA384,
    TPM_ALG_SHA512: hashes.SHA512,
}
_HASHLIB_NAMES = {
    TPM_ALG_SHA1: "sha1",
    TPM_ALG_SHA256: "sha256",
    TPM_ALG_SHA384: "sha384",
    TPM_ALG_SHA512: "sha512",
}
_CURVES: dict[int, type[ec.EllipticCurve]] = {
    TPM_ECC_NIST_P256: ec.SECP256R1,
    TPM_ECC_NIST_P384: ec.SECP384R1,
}

# Bounds taken generously above what any TPM emits, so that a hostile count
# cannot make the parser loop or allocate much.
_MAX_PCR_BANKS = 16
_MAX_SIZE_OF_SELECT = 32


# --- Errors -------------------------------------------------------------------


class QuoteError(Exception):
    """A quote (or other TPM evidence) was rejected; ``reason`` is a stable code."""

    reason: ClassVar[str] = "quote-error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = " ".join(detail.split())

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class Malformed(QuoteError):
    """Truncated or structurally invalid input."""

    reason = "malformed"


class BadMagic(Malformed):
    """The attest structure does not start with TPM_GENERATED_VALUE.

    The TPM refuses to sign external data that starts with the magic from a
    restricted key, so a wrong magic means the bytes did not come from a TPM.
    """

    reason = "bad-magic"


class TrailingBytes(Malformed):
    """Bytes left over after a complete structure (smuggling attempt or bug)."""

    reason = "trailing-bytes"


class NotAQuote(QuoteError):
    """A valid TPMS_ATTEST of another type (certify, time, ...) was offered."""

    reason = "not-a-quote"


class UnsupportedAlgorithm(QuoteError):
    """A signature or hash algorithm this verifier does not accept."""

    reason = "unsupported-algorithm"


class BadSignature(QuoteError):
    """The signature does not verify with the AK over the attest bytes."""

    reason = "bad-signature"


class WrongKey(BadSignature):
    """The quote was signed by another key than the expected AK.

    Only distinguishable from :class:`BadSignature` when the verifier knows the
    AK's TPM name (``qualifiedSigner`` names the key that signed) or when the
    signature kind cannot come from the AK at all (ECDSA vs an RSA AK).
    """

    reason = "wrong-key"


class NonceMismatch(QuoteError):
    """extraData is not the nonce the verifier sent: a replayed or stale quote."""

    reason = "nonce-mismatch"


class UnexpectedPcrSelection(QuoteError):
    """The quote covers other PCRs than the policy asks for."""

    reason = "unexpected-pcr-selection"


class PcrValuesMissing(QuoteError):
    """The evidence lacks a value for a PCR the quote selects."""

    reason = "pcr-values-missing"


class PcrDigestMismatch(QuoteError):
    """The claimed PCR values do not hash to the signed pcrDigest."""

    reason = "pcr-digest-mismatch"


class CounterRegression(QuoteError):
    """resetCount/restartCount changed or the clock went back since the last quote.

    A changed resetCount means the TPM was reset (host/VM reboot), a changed
    restartCount a TPM restart/resume; both invalidate the earlier trust.
    """

    reason = "counter-regression"


class AkRejected(QuoteError):
    """The key offered as the AK is not one a TPM can only use to attest."""

    reason = "ak-rejected"


class AkAttributesError(AkRejected):
    """The AK lacks restricted/sign/fixedTPM/fixedParent/sensitiveDataOrigin, or decrypts.

    A non-restricted signing key signs any digest, forged TPMS_ATTEST included;
    a key without fixedTPM/fixedParent may be duplicated out of the TPM, and one
    without sensitiveDataOrigin was imported, so its private part exists elsewhere.
    """

    reason = "ak-attributes"


class AkAlgorithmError(AkRejected):
    """The AK's name algorithm, signing scheme, hash, curve or key size is not accepted."""

    reason = "ak-algorithm"


class EkCertificateError(QuoteError):
    """The EK certificate is not an EK certificate from a trusted TPM manufacturer CA."""

    reason = "ek-certificate-invalid"


# --- Cursor ----------------------------------------------------------------------


class _Cursor:
    """Reads big-endian TPM fields, raising :class:`Malformed` instead of IndexError."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0
        self._what = what

    def take(self, n: int, field_name: str) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise Malformed(
                f"{self._what}: truncated at {field_name} (offset {self._pos}, "
                f"need {n}, have {len(self._data) - self._pos})"
            )
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def u8(self, field_name: str) -> int:
        return self.take(1, field_name)[0]

    def u16(self, field_name: str) -> int:
        return int(struct.unpack(">H", self.take(2, field_name))[0])

    def u32(self, field_name: str) -> int:
        return int(struct.unpack(">I", self.take(4, field_name))[0])

    def u64(self, field_name: str) -> int:
        return int(struct.unpack(">Q", self.take(8, field_name))[0])

    def tpm2b(self, field_name: str) -> bytes:
        return self.take(self.u16(f"{field_name}.size"), field_name)

    def finish(self) -> None:
        left = len(self._data) - self._pos
        if left:
            raise TrailingBytes(f"{self._what}: {left} byte(s) after the end of the structure")


# --- Structures -----------------------------------------------------------------


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO; the counters must be in clear (AK in the endorsement hierarchy)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank and the PCR indices selected in it, ascending."""

    hash_alg: int
    pcrs: tuple[int, ...]

    @property
    def bank(self) -> str:
        return _BANK_NAMES.get(self.hash_alg, f"0x{self.hash_alg:04x}")


@dataclass(frozen=True)
class QuoteInfo:
    """TPMS_QUOTE_INFO."""

    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class Attest:
    """TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE, as signed by the AK."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    quote: QuoteInfo


@dataclass(frozen=True)
class EcdsaSignature:
    """TPMT_SIGNATURE with sigAlg TPM_ALG_ECDSA."""

    hash_alg: int
    r: bytes
    s: bytes


@dataclass(frozen=True)
class RsassaSignature:
    """TPMT_SIGNATURE with sigAlg TPM_ALG_RSASSA (PKCS#1 v1.5)."""

    hash_alg: int
    sig: bytes


@dataclass(frozen=True)
class RsapssSignature:
    """TPMT_SIGNATURE with sigAlg TPM_ALG_RSAPSS."""

    hash_alg: int
    sig: bytes


TpmSignature = EcdsaSignature | RsassaSignature | RsapssSignature


@dataclass(frozen=True)
class QuoteResult:
    """A verified quote: what the REM-S may now rely on."""

    attest: Attest
    signature: TpmSignature
    pcrs: dict[str, dict[int, bytes]] = field(default_factory=dict)

    @property
    def clock_info(self) -> ClockInfo:
        return self.attest.clock_info

    def to_json(self) -> dict[str, object]:
        """JSON-ready summary (hex strings) for reports and ``--format json``."""
        ci = self.attest.clock_info
        return {
            "valid": True,
            "qualified_signer": self.attest.qualified_signer.hex(),
            "nonce": self.attest.extra_data.hex(),
            "clock": ci.clock,
            "reset_count": ci.reset_count,
            "restart_count": ci.restart_count,
            "safe": ci.safe,
            "firmware_version": self.attest.firmware_version,
            "pcr_digest": self.attest.quote.pcr_digest.hex(),
            "pcrs": {
                bank: {str(i): v.hex() for i, v in sorted(vals.items())}
                for bank, vals in self.pcrs.items()
            },
        }


# --- Parsers ----------------------------------------------------------------------


def _parse_pcr_selection(cur: _Cursor) -> tuple[PcrSelection, ...]:
    count = cur.u32("pcrSelect.count")
    if count > _MAX_PCR_BANKS:
        raise Malformed(f"TPMS_ATTEST: {count} PCR banks selected (max {_MAX_PCR_BANKS})")
    out = []
    for _ in range(count):
        alg = cur.u16("pcrSelect.hash")
        size = cur.u8("pcrSelect.sizeofSelect")
        if size > _MAX_SIZE_OF_SELECT:
            raise Malformed(f"TPMS_ATTEST: sizeofSelect {size} > {_MAX_SIZE_OF_SELECT}")
        bitmap = cur.take(size, "pcrSelect.pcrSelect")
        pcrs = tuple(
            byte_i * 8 + bit for byte_i, b in enumerate(bitmap) for bit in range(8) if b >> bit & 1
        )
        out.append(PcrSelection(alg, pcrs))
    return tuple(out)


def parse_attest(data: bytes) -> Attest:
    """Parse a TPMS_ATTEST that must be a quote and must be consumed entirely."""
    cur = _Cursor(data, "TPMS_ATTEST")
    magic = cur.u32("magic")
    if magic != TPM_GENERATED_VALUE:
        raise BadMagic(f"TPMS_ATTEST magic is 0x{magic:08x}, not 0x{TPM_GENERATED_VALUE:08x}")
    st = cur.u16("type")
    if st != TPM_ST_ATTEST_QUOTE:
        raise NotAQuote(f"TPMS_ATTEST type is 0x{st:04x}, not TPM_ST_ATTEST_QUOTE (0x8018)")
    signer = cur.tpm2b("qualifiedSigner")
    extra = cur.tpm2b("extraData")
    clock = ClockInfo(
        clock=cur.u64("clockInfo.clock"),
        reset_count=cur.u32("clockInfo.resetCount"),
        restart_count=cur.u32("clockInfo.restartCount"),
        safe=cur.u8("clockInfo.safe") != 0,
    )
    fw = cur.u64("firmwareVersion")
    sel = _parse_pcr_selection(cur)
    digest = cur.tpm2b("pcrDigest")
    cur.finish()
    return Attest(magic, st, signer, extra, clock, fw, QuoteInfo(sel, digest))


def parse_signature(data: bytes) -> TpmSignature:
    """Parse a marshalled TPMT_SIGNATURE (the tpm2-tools ``tss`` format).

    Unsupported algorithms are rejected here, before any cryptography runs.
    """
    cur = _Cursor(data, "TPMT_SIGNATURE")
    sig_alg = cur.u16("sigAlg")
    if sig_alg not in (TPM_ALG_ECDSA, TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        raise UnsupportedAlgorithm(
            f"signature algorithm 0x{sig_alg:04x} is not ECDSA, RSASSA or RSAPSS"
        )
    hash_alg = cur.u16("hash")
    if hash_alg not in _SIG_HASHES:
        raise UnsupportedAlgorithm(f"signature hash algorithm 0x{hash_alg:04x} is not accepted")
    sig: TpmSignature
    if sig_alg == TPM_ALG_ECDSA:
        sig = EcdsaSignature(hash_alg, cur.tpm2b("signatureR"), cur.tpm2b("signatureS"))
    elif sig_alg == TPM_ALG_RSAPSS:
        sig = RsapssSignature(hash_alg, cur.tpm2b("sig"))
    else:
        sig = RsassaSignature(hash_alg, cur.tpm2b("sig"))
    cur.finish()
    return sig


# --- Keys ----------------------------------------------------------------------------

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def load_public_key(pem_or_key: bytes | str | PublicKey) -> PublicKey:
    """Load an AK/EK public key from PEM (SubjectPublicKeyInfo) or pass one through."""
    if isinstance(pem_or_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return pem_or_key
    raw = pem_or_key.encode() if isinstance(pem_or_key, str) else pem_or_key
    try:
        key = serialization.load_pem_public_key(raw)
    except ValueError as exc:
        raise Malformed(f"public key is not a PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise UnsupportedAlgorithm(f"public key type {type(key).__name__} is not ECC or RSA")
    return key


@dataclass(frozen=True)
class TpmPublic:
    """A parsed TPMT_PUBLIC: enough to compute the TPM name, use the key and judge it.

    ``scheme``/``scheme_hash`` are the key's own signing (or encryption) scheme,
    TPM_ALG_NULL when the key leaves it to the caller; ``curve`` is the
    TPM_ECC_CURVE (0 for RSA); ``key_bits`` the RSA modulus or ECC curve size.
    """

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    sym_alg: int
    sym_key_bits: int
    key: PublicKey
    raw: bytes
    scheme: int = TPM_ALG_NULL
    scheme_hash: int = TPM_ALG_NULL
    curve: int = 0
    key_bits: int = 0

    @property
    def name(self) -> bytes:
        """TPM name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return tpm_name(self.raw)


def tpm_name(tpmt_public: bytes) -> bytes:
    """Compute the TPM name of a marshalled TPMT_PUBLIC (nameAlg || digest)."""
    cur = _Cursor(tpmt_public, "TPMT_PUBLIC")
    cur.u16("type")
    name_alg = cur.u16("nameAlg")
    if name_alg not in _HASHLIB_NAMES:
        raise UnsupportedAlgorithm(f"nameAlg 0x{name_alg:04x}")
    return struct.pack(">H", name_alg) + hashlib.new(_HASHLIB_NAMES[name_alg], tpmt_public).digest()


#: Handle of the endorsement hierarchy: the qualified name of its primary keys' parent.
TPM_RH_ENDORSEMENT = 0x4000000B


def qualified_name(name: bytes, parent_qualified_name: bytes | None = None) -> bytes:
    """TPM qualified name: nameAlg || H(parent QN || name) (Part 1 §16).

    A quote's qualifiedSigner is the AK's *qualified* name, not its name. For a
    primary key the parent QN is the hierarchy handle; the default is the
    endorsement hierarchy, where the VIMS AK lives.
    """
    if len(name) < 2:
        raise Malformed("TPM name too short")
    alg = int.from_bytes(name[:2], "big")
    if alg not in _HASHLIB_NAMES:
        raise UnsupportedAlgorithm(f"nameAlg 0x{alg:04x}")
    parent = (
        parent_qualified_name
        if parent_qualified_name is not None
        else struct.pack(">I", TPM_RH_ENDORSEMENT)
    )
    return name[:2] + hashlib.new(_HASHLIB_NAMES[alg], parent + name).digest()


def parse_public(data: bytes) -> TpmPublic:
    """Parse a TPM2B_PUBLIC (as sent by the A-VM) into a usable public key.

    The REM-S needs this to compute the AK name for MakeCredential and to
    recognise a quote signed by another key (qualifiedSigner != AK name).
    """
    outer = _Cursor(data, "TPM2B_PUBLIC")
    raw = outer.tpm2b("publicArea")
    outer.finish()
    cur = _Cursor(raw, "TPMT_PUBLIC")
    typ = cur.u16("type")
    name_alg = cur.u16("nameAlg")
    attrs = cur.u32("objectAttributes")
    policy = cur.tpm2b("authPolicy")
    sym_alg = cur.u16("symmetric.algorithm")
    sym_bits = 0
    if sym_alg != TPM_ALG_NULL:
        sym_bits = cur.u16("symmetric.keyBits")
        cur.u16("symmetric.mode")
    # TPMT_{ECC,RSA}_SCHEME: the details depend on the scheme (Part 2 §11.2): none
    # for RSAES, hashAlg + count for ECDAA, hashAlg for the others.
    scheme = cur.u16("scheme.scheme")
    scheme_hash = TPM_ALG_NULL
    if scheme not in (TPM_ALG_NULL, TPM_ALG_RSAES):
        scheme_hash = cur.u16("scheme.hashAlg")
        if scheme == TPM_ALG_ECDAA:
            cur.u16("scheme.count")
    key: PublicKey
    curve_id = 0
    if typ == TPM_ALG_ECC:
        curve_id = cur.u16("curveID")
        if cur.u16("kdf.scheme") != TPM_ALG_NULL:
            cur.u16("kdf.hashAlg")
        x = cur.tpm2b("unique.x")
        y = cur.tpm2b("unique.y")
        if curve_id not in _CURVES:
            raise UnsupportedAlgorithm(f"ECC curve 0x{curve_id:04x}")
        curve = _CURVES[curve_id]()
        key_bits = curve.key_size
        try:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        except ValueError as exc:
            raise Malformed(f"TPMT_PUBLIC: ECC point invalid: {exc}") from None
    elif typ == TPM_ALG_RSA:
        key_bits = cur.u16("keyBits")
        exponent = cur.u32("exponent") or 65537  # 0 means the default exponent
        n = cur.tpm2b("unique.rsa")
        if len(n) * 8 != key_bits:
            # keyBits is what a size check would read: it must be the modulus's size.
            raise Malformed(f"TPMT_PUBLIC: keyBits {key_bits} but a {len(n) * 8}-bit modulus")
        try:
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(n, "big")).public_key()
        except ValueError as exc:
            raise Malformed(f"TPMT_PUBLIC: RSA key invalid: {exc}") from None
    else:
        raise UnsupportedAlgorithm(f"TPMT_PUBLIC type 0x{typ:04x}")
    cur.finish()
    return TpmPublic(
        typ, name_alg, attrs, policy, sym_alg, sym_bits, key, raw,
        scheme=scheme, scheme_hash=scheme_hash, curve=curve_id, key_bits=key_bits,
    )  # fmt: skip


# What an AK must be (TPM 2.0 Part 1 §25-§27; Keylime's checks and stricter): a
# restricted key, so the TPM signs with it only digests it computed itself (a
# TPMS_ATTEST it built, never outside data starting with TPM_GENERATED_VALUE);
# signing only; born in this TPM and bound to it and its parent.
_AK_REQUIRED = {
    TPMA_OBJECT_RESTRICTED: "restricted",
    TPMA_OBJECT_SIGN_ENCRYPT: "sign",
    TPMA_OBJECT_FIXEDTPM: "fixedTPM",
    TPMA_OBJECT_FIXEDPARENT: "fixedParent",
    TPMA_OBJECT_SENSITIVEDATAORIGIN: "sensitiveDataOrigin",
}
_AK_NAME_ALGS = (TPM_ALG_SHA256, TPM_ALG_SHA384, TPM_ALG_SHA512)
_AK_SCHEME_HASHES = (TPM_ALG_SHA256, TPM_ALG_SHA384, TPM_ALG_SHA512)
_AK_ECC_HASHES = {TPM_ECC_NIST_P256: (TPM_ALG_SHA256, TPM_ALG_SHA384),
                  TPM_ECC_NIST_P384: (TPM_ALG_SHA256, TPM_ALG_SHA384)}
_AK_MIN_RSA_BITS = 2048


def check_ak_public(ak: TpmPublic) -> None:
    """Refuse a public area that is not a proper attestation key.

    Raises :class:`AkAttributesError` for the object attributes, then
    :class:`AkAlgorithmError` for algorithms: nameAlg SHA-256/384/512; ECC
    NIST P-256/P-384 with ECDSA and SHA-256/384, or RSA >= 2048 bits with
    RSASSA or RSAPSS and SHA-256 or stronger; the scheme fixed in the key (a
    NULL scheme would let the caller pick one) and no symmetric algorithm.
    """
    attrs = ak.object_attributes
    missing = [name for bit, name in _AK_REQUIRED.items() if not attrs & bit]
    if missing:
        raise AkAttributesError(f"AK lacks {', '.join(missing)} (objectAttributes 0x{attrs:08x})")
    if attrs & TPMA_OBJECT_DECRYPT:
        raise AkAttributesError(f"AK has decrypt set (objectAttributes 0x{attrs:08x})")
    if ak.name_alg not in _AK_NAME_ALGS:
        raise AkAlgorithmError(f"AK nameAlg 0x{ak.name_alg:04x} is not SHA-256/384/512")
    if ak.sym_alg != TPM_ALG_NULL:
        raise AkAlgorithmError(f"AK has a symmetric algorithm 0x{ak.sym_alg:04x}")
    if ak.type == TPM_ALG_ECC:
        if ak.curve not in _AK_ECC_HASHES:
            raise AkAlgorithmError(f"AK curve 0x{ak.curve:04x} is not NIST P-256/P-384")
        if ak.scheme != TPM_ALG_ECDSA:
            raise AkAlgorithmError(f"ECC AK scheme 0x{ak.scheme:04x} is not ECDSA")
        if ak.scheme_hash not in _AK_ECC_HASHES[ak.curve]:
            raise AkAlgorithmError(f"ECC AK scheme hash 0x{ak.scheme_hash:04x} is not SHA-256/384")
    elif ak.type == TPM_ALG_RSA:
        if ak.key_bits < _AK_MIN_RSA_BITS:
            raise AkAlgorithmError(f"RSA AK has {ak.key_bits} bits (< {_AK_MIN_RSA_BITS})")
        if ak.scheme not in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
            raise AkAlgorithmError(f"RSA AK scheme 0x{ak.scheme:04x} is not RSASSA or RSAPSS")
        if ak.scheme_hash not in _AK_SCHEME_HASHES:
            raise AkAlgorithmError(f"RSA AK scheme hash 0x{ak.scheme_hash:04x} is not SHA-2")
    else:
        raise AkAlgorithmError(f"AK type 0x{ak.type:04x} is not ECC or RSA")


# --- Quote verification --------------------------------------------------------------


def _check_signature(key: PublicKey, attest: bytes, sig: TpmSignature) -> None:
    algo = _SIG_HASHES[sig.hash_alg]()
    try:
        if isinstance(sig, EcdsaSignature):
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise WrongKey("ECDSA signature but the AK is not an ECC key")
            der = encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))
            key.verify(der, attest, ec.ECDSA(algo))
        elif isinstance(sig, RsapssSignature):
            if not isinstance(key, rsa.RSAPublicKey):
                raise WrongKey("RSAPSS signature but the AK is not an RSA key")
            # TPMs differ in the salt length they use (digest size or the maximum):
            # the salt length is read from the signature itself.
            pss = padding.PSS(mgf=padding.MGF1(algo), salt_length=padding.PSS.AUTO)
            key.verify(sig.sig, attest, pss, algo)
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                raise WrongKey("RSASSA signature but the AK is not an RSA key")
            key.verify(sig.sig, attest, padding.PKCS1v15(), algo)
    except InvalidSignature:
        raise BadSignature("signature does not verify with the AK") from None


def pcr_digest(
    selection: Sequence[PcrSelection], pcrs: Mapping[str, Mapping[int, bytes]], hash_alg: int
) -> bytes:
    """Hash the selected PCR values in selection order, as TPM2_Quote does."""
    h = hashlib.new(_HASHLIB_NAMES[hash_alg])
    for sel in selection:
        bank = pcrs.get(sel.bank, {})
        size = hashlib.new(_HASHLIB_NAMES[sel.hash_alg]).digest_size
        for i in sel.pcrs:
            if i not in bank:
                raise PcrValuesMissing(f"no {sel.bank} value for PCR {i}")
            if len(bank[i]) != size:
                raise Malformed(f"{sel.bank} PCR {i} value is {len(bank[i])} bytes, not {size}")
            h.update(bank[i])
    return h.digest()


def check_counters(previous: ClockInfo, current: ClockInfo) -> None:
    """Reject a quote whose TPM rebooted/restarted or whose clock went back."""
    if current.reset_count != previous.reset_count:
        raise CounterRegression(
            f"resetCount changed {previous.reset_count} -> {current.reset_count} (TPM reset)"
        )
    if current.restart_count != previous.restart_count:
        raise CounterRegression(
            f"restartCount changed {previous.restart_count} -> {current.restart_count} "
            "(TPM restart or resume)"
        )
    if current.clock < previous.clock:
        raise CounterRegression(f"clock went back {previous.clock} -> {current.clock}")


def verify_quote(
    ak_public_pem: bytes | str | PublicKey,
    attest: bytes,
    signature: bytes,
    nonce: bytes,
    pcrs: Mapping[str, Mapping[int, bytes]],
    expected_pcrs: Sequence[int] | None = None,
    previous_clock: ClockInfo | None = None,
    *,
    ak_qualified_name: bytes | None = None,
    expected_bank: str = "sha256",
) -> QuoteResult:
    """Verify a TPM2_Quote and return what it proves, or raise a :class:`QuoteError`.

    ``nonce`` is the raw bytes the verifier sent as qualifyingData (the one
    canonical encoding; the CLI converts hex at its boundary). ``pcrs`` maps a
    bank name to PCR index -> value. ``expected_pcrs``, when given, is the exact
    set of PCRs of ``expected_bank`` the quote must cover (and nothing else).
    ``ak_qualified_name`` (see :func:`qualified_name`) lets a foreign signature be reported as
    :class:`WrongKey` rather than :class:`BadSignature`.
    """
    sig = parse_signature(signature)
    parsed = parse_attest(attest)
    key = load_public_key(ak_public_pem)
    try:
        _check_signature(key, attest, sig)
    except WrongKey:
        raise
    except BadSignature:
        if ak_qualified_name is not None and not hmac.compare_digest(
            parsed.qualified_signer, ak_qualified_name
        ):
            raise WrongKey(
                f"quote signed by {parsed.qualified_signer.hex()}, "
                f"expected AK {ak_qualified_name.hex()}"
            ) from None
        raise
    if not hmac.compare_digest(parsed.extra_data, nonce):
        raise NonceMismatch(
            f"extraData {parsed.extra_data.hex()} is not the nonce sent ({nonce.hex()})"
        )
    selected = {(s.bank, i) for s in parsed.quote.pcr_select for i in s.pcrs}
    if expected_pcrs is not None:
        wanted = {(expected_bank, i) for i in expected_pcrs}
        if selected != wanted:
            raise UnexpectedPcrSelection(
                f"quote covers {_fmt_sel(selected)}, policy asks {_fmt_sel(wanted)}"
            )
    for s in parsed.quote.pcr_select:
        if s.hash_alg not in _HASHLIB_NAMES:
            raise UnsupportedAlgorithm(f"PCR bank 0x{s.hash_alg:04x}")
    digest = pcr_digest(parsed.quote.pcr_select, pcrs, sig.hash_alg)
    if not hmac.compare_digest(digest, parsed.quote.pcr_digest):
        raise PcrDigestMismatch(
            f"PCR values hash to {digest.hex()}, quote signed {parsed.quote.pcr_digest.hex()}"
        )
    if previous_clock is not None:
        check_counters(previous_clock, parsed.clock_info)
    quoted: dict[str, dict[int, bytes]] = {}
    for s in parsed.quote.pcr_select:
        for i in s.pcrs:
            quoted.setdefault(s.bank, {})[i] = bytes(pcrs[s.bank][i])
    return QuoteResult(parsed, sig, quoted)


def _fmt_sel(sel: set[tuple[str, int]]) -> str:
    banks: dict[str, list[int]] = {}
    for bank, i in sorted(sel):
        banks.setdefault(bank, []).append(i)
    return "; ".join(f"{b}:{','.join(map(str, v))}" for b, v in banks.items()) or "nothing"


# --- Credential activation (TPM 2.0 Part 1 §24, Part 2 TPM2_MakeCredential) ---------


def kdfa(
    hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """SP 800-108 counter-mode KDF with HMAC, as the TPM defines KDFa."""
    name = _HASHLIB_NAMES[hash_alg]
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        msg = struct.pack(">I", counter) + label + b"\0" + context_u + context_v
        msg += struct.pack(">I", bits)
        out += hmac.new(key, msg, name).digest()
    return out[: (bits + 7) // 8]


def kdfe(hash_alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """SP 800-56A concatenation KDF, as the TPM defines KDFe (label with its NUL)."""
    name = _HASHLIB_NAMES[hash_alg]
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hashlib.new(
            name, struct.pack(">I", counter) + z + label + b"\0" + party_u + party_v
        ).digest()
    return out[: (bits + 7) // 8]


def _ek_defaults(key: PublicKey) -> tuple[int, int]:
    """nameAlg and AES key bits of the TCG EK templates for this key kind.

    RSA-2048 and P-256 EKs (templates L-1/L-2/H-2/H-3) use SHA-256 + AES-128;
    the P-384 EK that swtpm_setup creates uses SHA-384 + AES-256.
    """
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size == 384:
        return TPM_ALG_SHA384, 256
    return TPM_ALG_SHA256, 128


def make_credential(
    ek_public: PublicKey | TpmPublic,
    ak_name: bytes,
    secret: bytes,
    *,
    name_alg: int | None = None,
    sym_key_bits: int | None = None,
) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in pure Python.

    Returns ``(credential_blob, encrypted_secret)`` marshalled as TPM2B_ID_OBJECT
    and TPM2B_ENCRYPTED_SECRET, ready for TPM2_ActivateCredential. Only the TPM
    holding the EK private key *and* a loaded object named ``ak_name`` can
    recover ``secret``, which is what binds the AK to the certified EK.
    """
    if isinstance(ek_public, TpmPublic):
        key = ek_public.key
        name_alg = name_alg or ek_public.name_alg
        sym_key_bits = sym_key_bits or ek_public.sym_key_bits or None
    else:
        key = ek_public
    d_alg, d_bits = _ek_defaults(key)
    name_alg = name_alg or d_alg
    sym_key_bits = sym_key_bits or d_bits
    if name_alg not in _SIG_HASHES:
        raise UnsupportedAlgorithm(f"EK nameAlg 0x{name_alg:04x}")
    hname = _HASHLIB_NAMES[name_alg]
    dsize = hashlib.new(hname).digest_size
    if len(secret) > dsize:
        raise Malformed(f"credential secret is {len(secret)} bytes, max {dsize}")

    if isinstance(key, rsa.RSAPublicKey):
        seed = os.urandom(dsize)
        enc = key.encrypt(
            seed,
            padding.OAEP(
                mgf=padding.MGF1(_SIG_HASHES[name_alg]()),
                algorithm=_SIG_HASHES[name_alg](),
                label=b"IDENTITY\0",
            ),
        )
        encrypted_secret = enc
    else:
        eph = ec.generate_private_key(key.curve)
        z = eph.exchange(ec.ECDH(), key)
        size = (key.curve.key_size + 7) // 8
        ex = eph.public_key().public_numbers().x.to_bytes(size, "big")
        ey = eph.public_key().public_numbers().y.to_bytes(size, "big")
        kx = key.public_numbers().x.to_bytes(size, "big")
        seed = kdfe(name_alg, z, b"IDENTITY", ex, kx, dsize * 8)
        encrypted_secret = struct.pack(">H", size) + ex + struct.pack(">H", size) + ey

    sym_key = kdfa(name_alg, seed, b"STORAGE", ak_name, b"", sym_key_bits)
    plain = struct.pack(">H", len(secret)) + secret
    enc_identity = Cipher(algorithms.AES(sym_key), CFB(b"\0" * 16)).encryptor().update(plain)
    hmac_key = kdfa(name_alg, seed, b"INTEGRITY", b"", b"", dsize * 8)
    outer_hmac = hmac.new(hmac_key, enc_identity + ak_name, hname).digest()
    id_object = struct.pack(">H", len(outer_hmac)) + outer_hmac + enc_identity
    return (
        struct.pack(">H", len(id_object)) + id_object,
        struct.pack(">H", len(encrypted_secret)) + encrypted_secret,
    )


# --- EK certificates -----------------------------------------------------------------


#: TCG EK Credential Profile OIDs: TPM attributes in the SAN's directoryName, and the
#: EKU that makes a certificate an EK certificate (and not, say, the platform
#: certificate swtpm_localca issues for the same key with 2.23.133.8.2).
OID_TCG_AT_TPM_MANUFACTURER = "2.23.133.2.1"
OID_TCG_AT_TPM_MODEL = "2.23.133.2.2"
OID_TCG_AT_TPM_VERSION = "2.23.133.2.3"
OID_TCG_KP_EK_CERTIFICATE = "2.23.133.8.1"
_TPM_ATTRIBUTES = {
    OID_TCG_AT_TPM_MANUFACTURER: "tpmManufacturer",
    OID_TCG_AT_TPM_MODEL: "tpmModel",
    OID_TCG_AT_TPM_VERSION: "tpmVersion",
}
# Root, vendor intermediates (some vendors have two levels), EK certificate.
_EK_MAX_CHAIN_DEPTH = 4


def _load_certs(data: bytes | x509.Certificate) -> list[x509.Certificate]:
    if isinstance(data, x509.Certificate):
        return [data]
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise EkCertificateError(f"not an X.509 certificate: {exc}") from None


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# Extension validators, called by cryptography's path validation; raising fails the
# candidate chain and the message ends up in the VerificationError.


def _issuer_is_ca(_p: Policy, cert: x509.Certificate, bc: x509.BasicConstraints) -> None:
    if not bc.ca:
        raise ValueError(f"issuer {cert.subject.rfc4514_string()!r} is not a CA")


def _issuer_may_sign(_p: Policy, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError(f"issuer {cert.subject.rfc4514_string()!r} lacks keyCertSign")


def _ek_not_ca(_p: Policy, _cert: x509.Certificate, bc: x509.BasicConstraints | None) -> None:
    if bc is not None and bc.ca:
        raise ValueError("an EK certificate must not be a CA certificate")


def _ek_key_usage(_p: Policy, cert: x509.Certificate, ku: x509.KeyUsage) -> None:
    # An EK decrypts (RSA: credential seeds by OAEP) or agrees keys (ECC: ECDH);
    # it never signs, which the TCG profile states through keyUsage.
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and not ku.key_encipherment:
        raise ValueError("RSA EK certificate without keyUsage keyEncipherment")
    if isinstance(key, ec.EllipticCurvePublicKey) and not ku.key_agreement:
        raise ValueError("ECC EK certificate without keyUsage keyAgreement")
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError(f"EK key type {type(key).__name__} is not RSA or ECC")


def _ek_eku(_p: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage) -> None:
    if x509.ObjectIdentifier(OID_TCG_KP_EK_CERTIFICATE) not in eku:
        raise ValueError(
            f"extendedKeyUsage lacks tcg-kp-EKCertificate ({OID_TCG_KP_EK_CERTIFICATE})"
        )


def _ek_san(_p: Policy, _cert: x509.Certificate, san: x509.SubjectAlternativeName) -> None:
    found: set[str] = set()
    for name in san.get_values_for_type(x509.DirectoryName):
        for attr in name:
            if attr.oid.dotted_string in _TPM_ATTRIBUTES and attr.value:
                found.add(attr.oid.dotted_string)
    missing = [label for oid, label in _TPM_ATTRIBUTES.items() if oid not in found]
    if missing:
        raise ValueError(f"subjectAltName directoryName lacks {', '.join(missing)}")


def _ek_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """Extension policies (CA, EK) of the TCG EK Credential Profile.

    Not the Web PKI's: an EK certificate has no serverAuth/clientAuth EKU, an
    often empty subject with a critical SAN that holds a directoryName, and an
    RSA key usable only for encipherment. Unknown critical extensions still
    fail; basicConstraints path lengths are enforced by the path building.
    """
    ca = (ExtensionPolicy.permit_all()
          .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _issuer_is_ca)
          .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _issuer_may_sign))
    ee = (ExtensionPolicy.permit_all()
          .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _ek_not_ca)
          .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _ek_key_usage)
          .require_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ek_eku)
          .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, _ek_san))
    return ca, ee


def validate_ek_certificate(
    cert_der_or_pem: bytes | x509.Certificate,
    ca_certs: Sequence[bytes | x509.Certificate],
) -> x509.Certificate:
    """Check that ``cert_der_or_pem`` is an EK certificate from a trusted EK CA; return it.

    ``ca_certs`` holds the trusted roots *and* any intermediates (PEM bundles
    allowed): self-signed certificates become trust anchors, the others
    untrusted intermediates that must chain to one. Path validation is
    cryptography's own (signatures, validity of every certificate,
    basicConstraints CA and path length of each issuer, keyCertSign), with the
    EK rules of the TCG EK Credential Profile on the leaf: keyUsage
    keyEncipherment (RSA) / keyAgreement (ECC), EKU tcg-kp-EKCertificate,
    SAN directoryName with tpmManufacturer, tpmModel and tpmVersion, not a CA.
    """
    leaves = _load_certs(cert_der_or_pem)
    if len(leaves) != 1:
        raise EkCertificateError(f"expected one EK certificate, got {len(leaves)}")
    leaf = leaves[0]
    pool = [c for data in ca_certs for c in _load_certs(data)]
    roots = [c for c in pool if _self_signed(c)]
    intermediates = [c for c in pool if not _self_signed(c)]
    if not roots:
        raise EkCertificateError("no trusted root (self-signed) among the EK CA certificates")
    ca_policy, ee_policy = _ek_policies()
    verifier = (PolicyBuilder().store(Store(roots))
                .max_chain_depth(_EK_MAX_CHAIN_DEPTH)
                .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
                .build_client_verifier())
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise EkCertificateError(f"{_describe(leaf)}: {exc}") from None
    return leaf


def _describe(cert: x509.Certificate) -> str:
    return (f"EK certificate serial {cert.serial_number:x} "
            f"(issuer {cert.issuer.rfc4514_string()!r})")
