"""Profiles built from Debian 12's real kernels (its 6.1 and its 6.12, fetched from the
archive like the lab's), plus every payload codec on crafted images."""

from __future__ import annotations

import base64
import bz2
import contextlib
import gzip
import json
import lzma
import re
import struct
import time
from pathlib import Path

import lz4.block  # type: ignore[import-untyped]
import lz4.frame  # type: ignore[import-untyped]
import pytest
import zstandard
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vims.lab.kernel import GuestKernel, ensure_kernel
from vims.vmi.cli import profile as profile_cli
from vims.vmi.errors import ProfileError
from vims.vmi.isf import build_isf
from vims.vmi.kallsyms import parse_kallsyms
from vims.vmi.kimage import extract_kernel, read_kernel
from vims.vmi.profile import (
    START_KERNEL_MAP,
    KernelAnalysis,
    Profile,
    _banner,
    analyze_kernel,
)

#: Debian 12's kernels: the current 6.1 (what linux-image-amd64 depends on) and 6.12.
KERNELS = ("linux-image-amd64", "linux-image-6.12-amd64")
#: Facts of each series that no Debian point release changes: the syscall count and
#: the last syscall (6.1: set_mempolicy_home_node; 6.10 added uretprobe, mseal last).
SERIES = {"6.1": (451, "__x64_sys_set_mempolicy_home_node"),
          "6.12": (463, "__x64_sys_mseal")}


@pytest.fixture(scope="module", params=KERNELS)
def guest_kernel(request: pytest.FixtureRequest) -> GuestKernel:
    """A Debian kernel package, fetched (once per machine) whatever an earlier run left."""
    return ensure_kernel(request.param if request.param != KERNELS[0] else None)


@pytest.fixture(scope="module")
def KERNEL(guest_kernel: GuestKernel) -> Path:
    return guest_kernel.vmlinuz


def series(release: str) -> str:
    return ".".join(release.split(".")[:2]).split("-")[0]

#: Symbols the checks, LibVMI and the cross-view walkers rely on.
KNOWN_SYMBOLS = ("startup_64", "_stext", "_etext", "sys_call_table", "init_task", "modules",
                 "idt_table", "x64_sys_call", "init_pid_ns", "runqueues", "__per_cpu_offset",
                 "module_kset", "__start___jump_table", "ftrace_pages_start")


@pytest.fixture(scope="module")
def analysis(KERNEL: Path) -> KernelAnalysis:
    start = time.monotonic()
    result = analyze_kernel(KERNEL)
    print(f"\nbenchmark: kernel analysis {time.monotonic() - start:.2f} s")
    return result


@pytest.fixture(scope="module")
def built(analysis: KernelAnalysis) -> Profile:
    start = time.monotonic()
    result = Profile.from_analysis(analysis)
    print(f"\nbenchmark: profile layout {time.monotonic() - start:.2f} s")
    return result


@pytest.fixture(scope="module")
def saved(built: Profile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    built.save(path)
    return path


def test_extraction_keeps_vmlinux_and_relocs(KERNEL: Path) -> None:
    kernel = read_kernel(KERNEL)
    assert kernel.source_format in ("xz", "zstd")  # Debian's choices for 6.1 and 6.12
    assert kernel.vmlinux[:4] == b"\x7fELF"
    assert 30 << 20 < len(kernel.vmlinux) < 200 << 20
    assert len(kernel.relocs) > 100_000  # a relocatable (KASLR) kernel
    assert len(kernel.relocs) % 4 == 0  # 32-bit words, read from the end at boot


def test_identity(built: Profile, guest_kernel: GuestKernel) -> None:
    # The release as the package names its /boot/vmlinuz-<release>.
    assert built.release == guest_kernel.release
    assert built.banner.startswith(f"Linux version {guest_kernel.release} (debian-kernel@")
    assert re.fullmatch(r"[0-9a-f]{40}", built.build_id)


def test_banner_without_the_symbol(analysis: KernelAnalysis) -> None:
    assert _banner(analysis.image, {}, analysis.extracted.vmlinux) == analysis.banner


def test_known_symbols_resolve(analysis: KernelAnalysis, built: Profile) -> None:
    for name in KNOWN_SYMBOLS:
        assert built.has_symbol(name), name
    assert 90_000 <= len(analysis.kallsyms) <= 250_000
    assert built.symbol("_text") == 0xFFFFFFFF81000000
    assert 0 <= built.symbol("startup_64") - built.symbol("_text") < 0x1000  # 6.12: not first
    assert built.symbol("_stext") <= built.symbol("x64_sys_call") < built.symbol("_etext")
    assert built.symbol("runqueues") < 0x100000  # per-CPU: an offset, not an address
    assert built.symbol_type("x64_sys_call") == "T"
    assert built.phys_startup_64 == built.symbol("startup_64") - START_KERNEL_MAP
    assert not built.has_symbol("no_such_symbol")
    with pytest.raises(ProfileError, match="no symbol 'no_such_symbol'"):
        built.symbol("no_such_symbol")
    assert built.symbolize(built.symbol("x64_sys_call") + 0x10) == "x64_sys_call+0x10"


def test_syscalls(built: Profile) -> None:
    count, last = SERIES[series(built.release)]
    assert built.nr_syscalls == count
    table = built.syscall_table
    assert len(table) == count
    assert built.symbolize(table[0]) == "__x64_sys_read"
    assert built.symbolize(table[count - 1]) == last


def test_offsets_of_this_build(built: Profile) -> None:
    # LibVMI and volatility walk the live lab guest with these; the layout moves between
    # series (6.4 replaced module.core_layout by module.mem[], 6.7 dropped
    # task_struct.thread_group for signal->thread_head), so each is checked where the kernel has it.
    tasks, mm, pid, comm = (built.offset("task_struct", m) for m in ("tasks", "mm", "pid", "comm"))
    assert 0 < tasks < mm < pid < comm < built.size("task_struct")
    assert built.offset("mm_struct", "pgd") % 8 == 0
    assert built.offset("module", "list") == 8
    if built.has_member("module", "core_layout"):
        assert built.offset("module", "core_layout.size") == built.offset(
            "module", "core_layout") + 8
    else:
        assert built.member_type("module", "mem").startswith("struct module_memory [")
    assert built.has_member("task_struct", "thread_group") or (
        built.has_member("signal_struct", "thread_head")
        and built.has_member("task_struct", "thread_node"))
    assert built.member_type("task_struct", "comm") == "char [16]"
    assert built.member_type("task_struct", "tasks") == "struct list_head"
    assert built.member_type("mm_struct", "pgd") == "pgd_t *"
    assert built.has_member("module", "mkobj.kobj")
    assert not built.has_member("task_struct", "no_such_member")
    assert built.enum("pid_type")["PIDTYPE_PID"] == 0


def test_layouts_are_consistent(built: Profile) -> None:
    assert built.size("list_head") == 16
    assert built.size("hlist_node") == 16
    assert built.offset("list_head", "prev") == 8
    assert built.offset("task_struct", "pid") < built.offset("task_struct", "comm") \
        < built.size("task_struct")
    assert len(built.struct_names()) > 5000
    for name in built.struct_names():
        size = built.size(name)
        for member, info in built._types[name]["members"].items():
            assert 0 <= info[0] <= size, (name, member)
            assert info[1] + info[2] <= 8 * size, (name, member)
            assert info[0] == info[1] // 8


def test_libvmi_config_and_system_map(built: Profile, tmp_path: Path) -> None:
    sysmap = tmp_path / "System.map"
    built.write_system_map(sysmap)
    config = built.libvmi_config(sysmap)
    tasks, mm, pid, comm = (built.offset("task_struct", m) for m in ("tasks", "mm", "pid", "comm"))
    assert config == ('{ ostype = "Linux"; sysmap = "' + str(sysmap) + f'"; linux_tasks = '
                      f"0x{tasks:x}; linux_mm = 0x{mm:x}; linux_pid = 0x{pid:x}; linux_name = "
                      f"0x{comm:x}; linux_pgd = 0x{built.offset('mm_struct', 'pgd'):x}; }}")
    lines = sysmap.read_text().splitlines()
    assert f"{built.phys_startup_64:016x} A phys_startup_64" in lines
    assert f"{built.symbol('startup_64'):016x} T startup_64" in lines
    addresses = [int(line.split()[0], 16) for line in lines]
    assert addresses == sorted(addresses)
    assert all(re.fullmatch(r"[0-9a-f]{16} [A-Za-z?] \S+", line) for line in lines[:1000])
    with pytest.raises(ProfileError):
        built.libvmi_config('/tmp/evil"; ostype = "Windows')


def test_save_load_round_trip(built: Profile, saved: Path) -> None:
    start = time.monotonic()
    loaded = Profile.load(saved)
    took = time.monotonic() - start
    print(f"\nbenchmark: profile load {took:.2f} s, {saved.stat().st_size >> 20} MiB")
    assert took < 3  # < 1 s on an idle machine; loose for loaded CI
    assert saved.stat().st_size < 20 << 20
    assert loaded.release == built.release
    assert loaded.build_id == built.build_id
    assert loaded.symbols == built.symbols
    assert loaded.offset("task_struct", "pid") == built.offset("task_struct", "pid")
    assert loaded.syscall_table == built.syscall_table
    assert loaded.text_layout.size == built.symbol("_etext") - built.symbol("_stext")


def test_wrong_format_is_refused(saved: Path, tmp_path: Path) -> None:
    data = json.loads(saved.read_text())
    data["format"] = "vims-profile/1"  # the format before patch sites were judged
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="format 'vims-profile/1'"):
        Profile.load(other)
    other.write_text("[1, 2]")
    with pytest.raises(ProfileError, match="not a VIMS profile"):
        Profile.load(other)
    other.write_text("{")
    with pytest.raises(ProfileError, match="not a readable JSON"):
        Profile.load(other)
    with pytest.raises(ProfileError, match="no such profile"):
        Profile.load(tmp_path / "missing.json")


def test_check_matches(built: Profile) -> None:
    built.check_matches(built.build_id.upper(), built.release)
    built.check_matches("", built.release)  # memory without a build-id: release decides
    release = re.escape(built.release)
    with pytest.raises(ProfileError, match=rf"profile is for kernel {release} \(build-id "
                                           rf"{built.build_id[:8]}.*\), the memory runs "
                                           rf"{release} \(build-id deadbeef\)"):
        built.check_matches("deadbeef", built.release)
    with pytest.raises(ProfileError, match=r"the memory runs 6\.1\.0-99-amd64"):
        built.check_matches(built.build_id, "6.1.0-99-amd64")


def test_isf_document(analysis: KernelAnalysis) -> None:
    isf = build_isf(analysis)
    assert isf["metadata"]["format"] == "6.2.0"
    banner = base64.b64decode(isf["symbols"]["linux_banner"]["constant_data"])
    assert banner == analysis.banner.encode() + b"\n"
    assert isf["symbols"]["init_task"]["type"] == {"kind": "struct", "name": "task_struct"}
    assert isf["symbols"]["modules"]["type"] == {"kind": "struct", "name": "list_head"}
    assert isf["symbols"]["sys_call_table"]["type"]["count"] == SERIES[
        series(analysis.release)][0]
    assert isf["symbols"]["taint_flags"]["type"]["count"] >= 19  # TAINT_FLAGS_COUNT in 6.1
    assert isf["symbols"]["runqueues"]["type"] == {"kind": "struct", "name": "rq"}
    task = isf["user_types"]["task_struct"]
    built = Profile.from_analysis(analysis)
    assert task["size"] == built.size("task_struct")
    assert task["fields"]["pid"]["offset"] == built.offset("task_struct", "pid")
    anonymous = [f for t in isf["user_types"].values() for f in t["fields"].values()
                 if f.get("anonymous")]
    assert anonymous
    assert all(f["type"]["name"] in isf["user_types"] for f in anonymous)
    assert isf["base_types"]["pointer"]["size"] == 8


def test_cli_build(tmp_path: Path, KERNEL: Path, guest_kernel: GuestKernel) -> None:
    out, isf = tmp_path / "p.json", tmp_path / "isf" / "vmlinux.json.xz"
    result = CliRunner().invoke(profile_cli, ["build", "--kernel", str(KERNEL), "--out", str(out),
                                              "--isf", str(isf), "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    print(f"\nbenchmark: vims profile build --isf {summary['seconds']} s, profile "
          f"{summary['profile_bytes'] >> 10} KiB, ISF {summary['isf_bytes'] >> 10} KiB")
    assert summary["release"] == guest_kernel.release
    assert summary["nr_syscalls"] == SERIES[series(guest_kernel.release)][0]
    assert summary["symbols"] > 80_000
    assert summary["types"] > 5000
    assert Profile.load(out).release == guest_kernel.release
    assert json.loads(lzma.decompress(isf.read_bytes()))["metadata"]["format"] == "6.2.0"


def test_bad_kernels_give_one_line_errors(tmp_path: Path, KERNEL: Path) -> None:
    truncated = tmp_path / "truncated"
    truncated.write_bytes(KERNEL.read_bytes()[:2_000_000])
    not_kernel = tmp_path / "passwd"
    not_kernel.write_text("root:x:0:0:root:/root:/bin/sh\n")
    for path, message in ((truncated, "truncated"), (not_kernel, "not a kernel image"),
                          (tmp_path / "missing", "no such file")):
        with pytest.raises(ProfileError, match=message) as info:
            analyze_kernel(path)
        assert "\n" not in str(info.value)
    result = CliRunner().invoke(profile_cli, ["build", "--kernel", str(not_kernel), "--out",
                                              str(tmp_path / "p.json")])
    assert isinstance(result.exception, ProfileError)


# -- every payload codec, on a small crafted bzImage ----------------------------------------

def tiny_elf() -> bytes:
    """An ELF64 header and one 16-byte section-less segment: what elf_size() measures."""
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 64 + 56, 0xFFFFFFFF81000000, 0x1000000, 16, 16, 16)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1,
                       0xFFFFFFFF81000000, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    return ehdr + phdr + b"K" * 16


def bzimage(payload: bytes) -> bytes:
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 0, len(payload) + 4)
    return bytes(setup) + payload + struct.pack("<I", 0x1234)  # size_append trailer


def lz4_legacy(data: bytes) -> bytes:
    blocks = [struct.pack("<I", 0x184C2102)]
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i:i + (8 << 20)], store_size=False)
        blocks.append(struct.pack("<I", len(block)) + block)
    return b"".join(blocks)


CODECS = {
    "xz": lzma.compress,
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "lz4": lz4_legacy,
    "lz4-frame": lz4.frame.compress,
    "none": lambda d: d,
}


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_payload_codecs(codec: str) -> None:
    raw = tiny_elf() + b"RELOCS" * 10
    image = bzimage(CODECS[codec](raw))
    kernel = extract_kernel(image)
    assert kernel.source_format == codec.removesuffix("-frame")
    assert kernel.vmlinux == tiny_elf()
    expected_relocs = b"RELOCS" * 10
    if codec == "none":  # no stream end: the size trailer stays with the relocations
        expected_relocs += struct.pack("<I", 0x1234)
    assert kernel.relocs == expected_relocs
    if codec != "none":
        compressed = CODECS[codec](raw)
        with pytest.raises(ProfileError, match=r"truncated|corrupt"):
            extract_kernel(bzimage(compressed[:len(compressed) * 2 // 3]))
    bomb = bzimage(CODECS[codec](tiny_elf() + bytes(4 << 20)))
    if codec != "none":
        with pytest.raises(ProfileError, match="beyond 1 MiB"):
            extract_kernel(bomb, limit=1 << 20)


def test_plain_vmlinux_and_refusals() -> None:
    assert extract_kernel(tiny_elf() + b"junk").source_format == "elf"
    assert extract_kernel(tiny_elf() + b"junk").relocs == b""
    with pytest.raises(ProfileError, match="LZO"):
        extract_kernel(bzimage(b"\x89LZO\x00" + bytes(64)))
    with pytest.raises(ProfileError, match="unknown kernel payload compression"):
        extract_kernel(bzimage(b"\x00\x01\x02\x03" + bytes(64)))
    with pytest.raises(ProfileError, match="not an ELF vmlinux"):
        extract_kernel(bzimage(gzip.compress(b"hello world" * 10)))
    with pytest.raises(ProfileError, match="ELF truncated"):
        extract_kernel(tiny_elf()[:100])
    with pytest.raises(ProfileError, match="too short"):
        extract_kernel(b"MZ" + bytes(100))


# -- kallsyms on crafted tables, in both layouts --------------------------------------------

BASE = 0xFFFFFFFF81000000
TOKENS = [bytes([i]) if 0x20 < i < 0x7F else b"~%d" % i for i in range(256)]


def kallsyms_image(symbols: list[tuple[str, str, int]], later_layout: bool) -> bytes:
    """Tables as scripts/kallsyms.c lays them out (one token per character)."""
    def align(blob: bytearray) -> None:
        blob.extend(bytes(-len(blob) % 8))

    names, markers = bytearray(), []
    for i, (letter, name, _) in enumerate(symbols):
        if i % 256 == 0:
            markers.append(len(names))
        encoded = (letter + name).encode()
        names += bytes([len(encoded)]) + encoded
    offsets = struct.pack(f"<{len(symbols)}i", *(
        addr if letter == "A" else BASE - 1 - addr for letter, _, addr in symbols))
    token_table = b"".join(t + b"\0" for t in TOKENS)
    token_index = struct.pack("<256H", *[sum(len(t) + 1 for t in TOKENS[:i]) for i in range(256)])
    head, tables = bytearray(b"\xcc" * 40), bytearray()
    parts_names = [struct.pack("<II", len(symbols), 0), bytes(names)]
    parts_tail = [struct.pack(f"<{len(markers)}I", *markers), token_table, token_index]
    parts_offsets = [offsets, struct.pack("<Q", BASE)]
    order = (parts_names + parts_tail + parts_offsets if later_layout
             else parts_offsets + parts_names + parts_tail)
    for part in order:
        align(tables)
        tables += part
    return bytes(head + tables + b"\xcc" * 64)


def crafted_symbols(count: int) -> list[tuple[str, str, int]]:
    percpu = [("A", "fixed_percpu_data", 0), ("A", "runqueues", 0x31C40)]
    return percpu + [("T" if i % 3 else "D", f"sym_{i}", BASE + 16 * i)
                     for i in range(count - len(percpu))]


@pytest.mark.parametrize("count", [700, 301])
@pytest.mark.parametrize("later_layout", [False, True])
def test_kallsyms_layouts(later_layout: bool, count: int) -> None:
    symbols = crafted_symbols(count)
    table = parse_kallsyms(kallsyms_image(symbols, later_layout), BASE)
    assert len(table) == count
    assert table.names == [name for _, name, _ in symbols]
    assert table.addresses == [addr for _, _, addr in symbols]
    assert table.types == "".join(letter for letter, _, _ in symbols)
    assert table.by_name()["runqueues"] == 0x31C40


def test_kallsyms_absent_or_wrong_base() -> None:
    with pytest.raises(ProfileError, match="token table not found"):
        parse_kallsyms(b"\0" * 4096, BASE)
    with pytest.raises(ProfileError, match="kallsyms tables not found"):
        parse_kallsyms(kallsyms_image(crafted_symbols(300), False), BASE + 0x1000)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
                min_size=1, max_size=8), st.booleans())
def test_kallsyms_fuzz_only_raises_profile_error(flips: list[tuple[int, int]],
                                                  later_layout: bool) -> None:
    image = bytearray(kallsyms_image(crafted_symbols(300), later_layout))
    for pos, value in flips:
        image[pos % len(image)] = value
    with contextlib.suppress(ProfileError):
        table = parse_kallsyms(bytes(image), BASE)
        assert len(table.names) == len(table.addresses) == len(table.types)
