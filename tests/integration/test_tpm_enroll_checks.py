"""The REM-S's enrollment checks against attacks from a real TPM (swtpm, in-process).

No REM-S process: :class:`vims.rems.enroll.Enroller` is the REM-S half that the
HTTP API drives, so each attack here is what a hostile A-VM can send it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from vims.rems.enroll import Enroller, EnrollmentError, enroll
from vims.rems.store import Store
from vims.tpm.attester import Attester
from vims.tpm.ekca import EkCa
from vims.tpm.swtpm import Swtpm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm not installed"),
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Swtpm, list[Path], Store]]:
    root = tmp_path_factory.mktemp("enroll-checks")
    ca, _ = EkCa.init(root / "rems-ek-ca")
    tpm = Swtpm(root / "swtpm", ca)
    tpm.manufacture()
    with tpm:
        yield tpm, ca.cert_paths, Store(f"sqlite:///{root / 'rems.db'}")


def test_the_real_ak_enrolls(lab: tuple[Swtpm, list[Path], Store]) -> None:
    tpm, cas, store = lab
    with Attester(tpm.tcti) as a:
        done = enroll(store, "avm1", a, cas)
    assert done.changed
    assert store.ak_of("avm1") is not None


def test_non_restricted_signing_key_as_ak_is_refused(
    lab: tuple[Swtpm, list[Path], Store],
) -> None:
    """A key that signs anything would let the A-VM forge quotes over golden PCRs.

    It is on the right TPM, so MakeCredential/ActivateCredential alone would
    accept it: the REM-S must look at the key's attributes itself.
    """
    from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_PUBLIC

    tpm, cas, store = lab
    with Attester(tpm.tcti) as a:
        template = TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256:null",
            objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
            | TPMA_OBJECT.SIGN_ENCRYPT)  # no RESTRICTED
        handle, rogue, _, _, _ = a.esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        try:
            with pytest.raises(EnrollmentError) as exc:
                Enroller(store, cas).challenge("rogue", a.ek_certificate(), a.ek_public(),
                                               bytes(rogue.marshal()))
        finally:
            a.esapi.flush_context(handle)
    assert "ak-attributes" in str(exc.value)
    assert "restricted" in str(exc.value)
    assert store.ak_of("rogue") is None
