"""Golden-image baselines: the cpio reader, ELF text pages, bad archives."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from vims.baseline import BaselineError, cpio_files, elf_text, load_image_files
from vims.lab.initramfs import find_static_busybox


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(find_static_busybox(), root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("not an ELF\n")
    return root


def _cpio(root: Path, out: Path) -> Path:
    names = "\n".join(sorted(str(p.relative_to(root)) for p in root.rglob("*"))) + "\n"
    data = subprocess.run([str(find_static_busybox()), "cpio", "-o", "-H", "newc"], cwd=root,
                          input=names.encode(), capture_output=True, check=True).stdout
    out.write_bytes(gzip.compress(data))
    return out


def test_initramfs_and_rootfs_give_the_same_executables(rootfs: Path, tmp_path: Path) -> None:
    from_dir = load_image_files(None, rootfs)
    from_cpio = load_image_files(_cpio(rootfs, tmp_path / "i.cpio.gz"), None)
    assert set(from_dir) == {"/bin/busybox"}  # symlinks and non-ELF files are skipped
    assert from_cpio == from_dir


def test_elf_text_pages_cover_the_executable_segment() -> None:
    data = find_static_busybox().read_bytes()
    entry = elf_text(data)
    assert entry is not None
    assert entry["text_start"] < entry["text_end"]
    pages = sorted(int(k) for k in entry["pages"])
    assert pages[0] == entry["text_start"] & ~0xFFF
    assert pages[-1] < entry["text_end"]
    assert len(pages) == len(range(pages[0], entry["text_end"], 4096))
    assert elf_text(b"\x7fELF" + b"\0" * 60) is None
    assert elf_text(b"#!/bin/sh\n") is None


@pytest.mark.parametrize("archive", [b"070701" + b"zz" * 52, b"not a cpio at all" * 10])
def test_corrupt_archives_are_refused(archive: bytes) -> None:
    with pytest.raises(BaselineError):
        list(cpio_files(archive))


def test_truncated_archive_is_refused(rootfs: Path, tmp_path: Path) -> None:
    raw = gzip.decompress(_cpio(rootfs, tmp_path / "i.cpio.gz").read_bytes())
    with pytest.raises(BaselineError, match="truncated"):
        list(cpio_files(raw[: len(raw) // 2]))


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match="does not exist"):
        load_image_files(tmp_path / "nope.cpio", None)
    with pytest.raises(BaselineError, match="not a directory"):
        load_image_files(None, tmp_path / "nope")
