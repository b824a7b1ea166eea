"""The xen_host role without a Xen host: its templates render to configs that
xl's own parser (libxlutil) accepts, a broken one is refused before it is
installed, and the role refuses a host without TXT when tboot is required."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]
BIN = ROOT / ".venv-ctl" / "bin"
HAS_XLUTIL = any(Path("/usr/lib").glob("*/libxlutil.so*"))


def ansible(*args: str, extra: dict[str, object] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / args[0]), *args[1:]]
    if extra is not None:
        cmd += ["-e", json.dumps(extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          cwd=ROOT, env={**os.environ, "VIMS_ROOT": str(ROOT),
                                         "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
                                         "ANSIBLE_NOCOLOR": "1"})


DOMAINS = [
    {"name": "cvm1", "type": "pvh", "memory": 512, "kernel": "/var/lib/vims/cvm1/vmlinuz",
     "ramdisk": "/var/lib/vims/cvm1/initrd.img", "extra": "console=hvc0 root=/dev/xvda",
     "disks": ["format=raw,vdev=xvda,access=rw,target=/var/lib/vims/cvm1/disk.img"],
     "vifs": ["bridge=xenbr0"]},
    {"name": "cvm2", "type": "hvm", "memory": 1024, "vcpus": 2, "vtpm": True,
     "disks": ["format=qcow2,vdev=hda,access=rw,target=/var/lib/vims/cvm2/disk.qcow2"]},
]


@pytest.mark.skipif(not HAS_XLUTIL, reason="libxlutil (libxenmisc4.17) not installed")
def test_templates_render_to_configs_xl_accepts(tmp_path: Path) -> None:
    proc = ansible("ansible-playbook", str(Path(__file__).with_name("xen_host_render.yml")),
                   extra={"out_dir": str(tmp_path), "domains": DOMAINS})
    assert proc.returncode == 0, proc.stdout[-2000:]
    pvh = (tmp_path / "cvm1.cfg").read_text()
    assert pvh.startswith("#")  # ansible_managed
    assert 'type = "pvh"' in pvh
    assert 'tsc_mode = "native"' in pvh
    assert "device_model_args_hvm" not in pvh
    hvm = (tmp_path / "cvm2.cfg").read_text()
    assert "kernel" not in hvm
    assert "tpmdev=tpm0" in hvm
    assert "/var/lib/vims/vtpm/cvm2/swtpm.sock" in hvm
    grub = (tmp_path / "grub-xen.cfg").read_text()
    assert ('GRUB_CMDLINE_XEN_DEFAULT="dom0_mem=2048M,max:2048M dom0_max_vcpus=2 smap=0"'
            in grub)
    # Sourced as grub-mkconfig sources it, after /etc/default/grub: Xen is the default
    # entry, by the title 20_linux_xen gives it.
    default = subprocess.run(
        ["sh", "-c", 'GRUB_DISTRIBUTOR=Debian; . "$1"; printf %s "$GRUB_DEFAULT"', "sh",
         str(tmp_path / "grub-xen.cfg")],
        capture_output=True, text=True, timeout=10, check=True).stdout
    assert default == "Debian GNU/Linux, with Xen hypervisor"
    assert 'GRUB_TBOOT_POLICY_DATA="tboot-vims.pol"' in (tmp_path / "grub-tboot").read_text()


@pytest.mark.skipif(not HAS_XLUTIL, reason="libxlutil (libxenmisc4.17) not installed")
def test_a_broken_domain_config_is_refused(tmp_path: Path) -> None:
    broken = [{"name": "cvm3", "type": "pvh", "kernel": '/boot/vmlinuz"\nmemory = = 1'}]
    proc = ansible("ansible-playbook", str(Path(__file__).with_name("xen_host_render.yml")),
                   extra={"out_dir": str(tmp_path), "domains": broken})
    assert proc.returncode != 0
    assert "failed to validate" in proc.stdout
    assert not (tmp_path / "cvm3.cfg").exists()


def test_tboot_required_without_txt_is_refused() -> None:
    if "smx" in Path("/proc/cpuinfo").read_text().split():
        pytest.skip("this host has TXT")
    proc = ansible("ansible", "localhost", "-m", "ansible.builtin.include_role",
                   "-a", "name=vims.attestation.xen_host tasks_from=preflight.yml",
                   extra={"xen_host_tboot_enabled": True, "xen_host_tboot_required": True,
                          "ansible_facts": {"distribution": "Debian",
                                            "distribution_major_version": "12",
                                            "architecture": "x86_64"}})
    assert proc.returncode != 0
    assert "has no Intel TXT" in proc.stdout
    assert "cannot make a measured launch" in proc.stdout


def test_argument_specs_refuse_a_bad_type() -> None:
    proc = ansible("ansible", "localhost", "-m", "ansible.builtin.include_role",
                   "-a", "name=vims.attestation.xen_host",
                   extra={"xen_host_domains": "cvm1"})
    assert proc.returncode != 0
    assert "xen_host_domains" in proc.stdout
