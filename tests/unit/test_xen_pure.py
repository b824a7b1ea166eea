"""The Xen lab's pure parts: domU configuration, types, the inittab overlay, the dom0 lock list."""

from __future__ import annotations

import gzip
import subprocess
import zlib
from pathlib import Path

import pytest

from vims.baseline import cpio_files
from vims.checks.base import Category, Check, Context, NotApplicable, Severity, Status
from vims.errors import LabError
from vims.lab.xen import domu_config, domu_initrd, domu_types
from vims.lab.xenimage import dom0_requirements
from vims.rems.verdict import TIERS, VerdictPolicy, appraise


def test_domu_types_accepts_lists_and_rejects_hvm() -> None:
    assert domu_types("pv") == ["pv"]
    assert domu_types("pv, pvh") == ["pv", "pvh"]
    for bad in ("hvm", "", "pv,,pvh"):
        with pytest.raises(LabError, match="bad domU type"):
            domu_types(bad)


def test_pvh_config_carries_the_tsc_settings_and_pv_does_not() -> None:
    pvh = domu_config("cvm2", "pvh", 256)
    assert 'type = "pvh"' in pvh
    assert 'tsc_mode = "native"' in pvh
    assert 'cpuid = "host,rdtscp=0"' in pvh
    pv = domu_config("cvm1", "pv", 256)
    assert "tsc_mode" not in pv
    assert "memory = 256" in pv
    assert 'extra = "console=hvc0' in pv


def test_domu_initrd_is_one_gzip_member_whose_later_inittab_wins(tmp_path: Path) -> None:
    from vims.lab.initramfs import find_static_busybox

    try:
        find_static_busybox()
    except LabError:
        pytest.skip("busybox-static not installed")

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/inittab").write_text("ttyS0::respawn:/sbin/x\n")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"\x7fELF-not-really")
    cpio = subprocess.run(["busybox", "cpio", "-o", "-H", "newc"], cwd=root,
                          input=b"etc\netc/inittab\nbin\nbin/tool\n", capture_output=True,
                          check=True).stdout
    src = tmp_path / "cvm.cpio.gz"
    src.write_bytes(gzip.compress(cpio))
    out = tmp_path / "domu.cpio.gz"
    domu_initrd(src, out)
    raw = out.read_bytes()
    # libxc inflates one member only: the file must be a single gzip stream.
    d = zlib.decompressobj(31)
    body = d.decompress(raw)
    assert d.unused_data == b""
    # The baseline reads the first archive (the original, byte for byte) ...
    assert dict(cpio_files(body))["/bin/tool"] == b"\x7fELF-not-really"
    # ... and the kernel unpacks the second after it, replacing the inittab.
    assert body.startswith(cpio)
    assert b"hvc0::respawn:/sbin/vims-console" in body[len(cpio):]


def test_dom0_requirements_leave_out_the_tpm_and_test_stacks() -> None:
    names = {r.split("==")[0] for r in dom0_requirements()}
    assert "libvmi" in names
    assert "click" in names
    assert not names & {"tpm2-pytss", "pytest", "mypy", "volatility3"}


class _PvOnly(Check):
    id = "kernel.test_na"
    description = "raises NotApplicable"
    severity = Severity.HIGH
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[object]:  # type: ignore[override]
        raise NotApplicable("Xen PV domain: not what the CPU uses")


def test_not_applicable_is_its_own_status_and_affirms_nothing() -> None:
    result = _PvOnly().execute(None)  # type: ignore[arg-type]
    assert result.status == Status.NOT_APPLICABLE
    assert result.error == "Xen PV domain: not what the CPU uses"
    report = {"checks": [{"id": "kernel.idt", "status": "not_applicable",
                          "category": "executables", "error": "PV"}], "findings": []}
    appraisal = appraise(report, VerdictPolicy(name="test"))
    assert appraisal.vector["executables"] == TIERS["none"]
