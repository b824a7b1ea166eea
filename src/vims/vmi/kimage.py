"""Extract the vmlinux ELF (and its KASLR relocation table) from an x86 bzImage.

Why: everything a profile needs (BTF, kallsyms, the banner, the build-id)
is inside the compressed payload of the kernel the C-VM boots, so the vendor's
bzImage is the only input, not a debug package.

The x86 boot protocol (Documentation/arch/x86/boot.rst) puts the setup header
in the first sector: ``setup_sects`` at 0x1f1, the ``HdrS`` magic at 0x202 and,
from protocol 2.08, ``payload_offset``/``payload_length`` at 0x248/0x24c,
relative to the protected-mode code that starts at ``(setup_sects + 1) * 512``.
The payload is ``vmlinux.bin`` (the stripped vmlinux ELF) followed by the
``relocs`` tool's output, compressed with one of the kernel's codecs, which is
recognised by its magic. The trailing relocation words are kept: applying them
with the KASLR slide reproduces the booted kernel's text.

Kernel files come from anywhere: all sizes are checked, decompression is
bounded (:data:`MAX_VMLINUX_BYTES`), and every failure is a
:class:`~vims.vmi.errors.ProfileError`.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lz4.block  # type: ignore[import-untyped]
import lz4.frame  # type: ignore[import-untyped]
import zstandard

from vims.vmi.errors import ProfileError

__all__ = ["MAX_VMLINUX_BYTES", "ExtractedKernel", "elf_size", "extract_kernel", "read_kernel"]

#: Largest decompressed payload accepted; real x86_64 kernels are < 100 MiB.
MAX_VMLINUX_BYTES = 512 << 20
_ELF_MAGIC = b"\x7fELF"
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20  # uncompressed size of every legacy lz4 block but the last


@dataclass(frozen=True)
class ExtractedKernel:
    """The vmlinux ELF, the relocation table that followed it, and how it was packed.

    ``source_format`` is ``elf`` for a plain vmlinux, else the payload codec:
    ``xz``, ``lzma``, ``gzip``, ``bzip2``, ``zstd``, ``lz4`` or ``none``.
    """

    vmlinux: bytes
    relocs: bytes
    source_format: str


def read_kernel(path: Path, limit: int = MAX_VMLINUX_BYTES) -> ExtractedKernel:
    """Read a bzImage or vmlinux file and extract its vmlinux."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise ProfileError(f"{path}: {size} bytes, more than a kernel image can be")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ProfileError(f"{path}: is a directory, expected a kernel image") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return extract_kernel(data, limit)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def extract_kernel(data: bytes, limit: int = MAX_VMLINUX_BYTES) -> ExtractedKernel:
    """Split a bzImage (or a plain vmlinux ELF) into vmlinux and relocations."""
    if data[:4] == _ELF_MAGIC:
        end = elf_size(data)
        return ExtractedKernel(vmlinux=data[:end], relocs=b"", source_format="elf")
    payload = _bzimage_payload(data)
    codec, decompress = _codec(payload)
    raw = decompress(payload, limit)
    if raw[:4] != _ELF_MAGIC:
        raise ProfileError(f"{codec} payload is not an ELF vmlinux (starts {raw[:4].hex()})")
    end = elf_size(raw)
    return ExtractedKernel(vmlinux=raw[:end], relocs=raw[end:], source_format=codec)


def _bzimage_payload(data: bytes) -> bytes:
    if len(data) < 0x250:
        raise ProfileError(f"not a kernel image: {len(data)} bytes, too short for a boot header")
    if data[0x202:0x206] != b"HdrS":
        raise ProfileError("not a kernel image: no ELF magic and no x86 'HdrS' boot header")
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        raise ProfileError(f"boot protocol {version >> 8}.{version & 0xFF:02d} predates "
                           "payload_offset (2.08); kernel too old")
    setup_sects = data[0x1F1] or 4  # 0 means 4 for historical reasons
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if payload_length == 0 or start + payload_length > len(data):
        raise ProfileError(f"kernel image truncated: payload {start}+{payload_length} beyond "
                           f"{len(data)} bytes")
    return data[start:start + payload_length]


Decompressor = Callable[[bytes, int], bytes]


def _codec(payload: bytes) -> tuple[str, Decompressor]:
    magic = payload[:6]
    if magic == b"\xfd7zXZ\x00":
        return "xz", lambda p, n: _lzma(p, n, lzma.FORMAT_XZ, "xz")
    if magic[:2] == b"\x1f\x8b":
        return "gzip", _gzip
    if magic[:3] == b"BZh":
        return "bzip2", _bzip2
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd", _zstd
    if magic[:4] == struct.pack("<I", _LZ4_LEGACY_MAGIC):
        return "lz4", _lz4_legacy
    if magic[:4] == b"\x04\x22\x4d\x18":
        return "lz4", _lz4_frame
    if magic[:1] == b"\x5d" and magic[1:3] != b"\xff\xff":  # lzma-alone: props 0x5d, dict size
        return "lzma", lambda p, n: _lzma(p, n, lzma.FORMAT_ALONE, "lzma")
    if magic[:4] == _ELF_MAGIC:
        return "none", lambda p, n: p
    if magic[:4] == b"\x89LZO":
        raise ProfileError("LZO-compressed kernel payloads are not supported")
    raise ProfileError(f"unknown kernel payload compression (magic {magic.hex()})")


def _bounded(codec: str, out: bytes, complete: bool, limit: int) -> bytes:
    if len(out) > limit:
        raise ProfileError(f"{codec} payload decompresses beyond {limit >> 20} MiB; refused")
    if not complete:
        raise ProfileError(f"{codec} payload truncated (stream ends early)")
    return out


def _lzma(payload: bytes, limit: int, fmt: int, codec: str) -> bytes:
    dec = lzma.LZMADecompressor(format=fmt)
    try:
        out = dec.decompress(payload, max_length=limit + 1)
    except lzma.LZMAError as exc:
        raise ProfileError(f"{codec} payload corrupt: {exc}") from None
    return _bounded(codec, out, dec.eof, limit)


def _gzip(payload: bytes, limit: int) -> bytes:
    dec = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = dec.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise ProfileError(f"gzip payload corrupt: {exc}") from None
    return _bounded("gzip", out, dec.eof, limit)


def _bzip2(payload: bytes, limit: int) -> bytes:
    dec = bz2.BZ2Decompressor()
    try:
        out = dec.decompress(payload, max_length=limit + 1)
    except OSError as exc:
        raise ProfileError(f"bzip2 payload corrupt: {exc}") from None
    return _bounded("bzip2", out, dec.eof, limit)


def _zstd(payload: bytes, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        dec = zstandard.ZstdDecompressor().decompressobj()
        # Feed 4 KiB at a time: zstd expands at most ~32768x (RLE blocks), so a bomb
        # is stopped within 128 MiB of the limit instead of exhausting memory.
        for pos in range(0, len(payload), 4096):
            chunk = dec.decompress(payload[pos:pos + 4096])
            chunks.append(chunk)
            total += len(chunk)
            if total > limit or dec.eof:
                break
    except zstandard.ZstdError as exc:
        raise ProfileError(f"zstd payload corrupt: {exc}") from None
    return _bounded("zstd", b"".join(chunks), dec.eof, limit)


def _lz4_frame(payload: bytes, limit: int) -> bytes:
    dec = lz4.frame.LZ4FrameDecompressor()
    try:
        out = dec.decompress(payload, max_length=limit + 1)
    except RuntimeError as exc:
        raise ProfileError(f"lz4 payload corrupt: {exc}") from None
    return _bounded("lz4", out, dec.eof, limit)


def _lz4_legacy(payload: bytes, limit: int) -> bytes:
    """The legacy lz4 format the kernel uses (``lz4 -l``): magic, then sized 8 MiB blocks.

    The kernel build appends the uncompressed size as 4 bytes, which is what
    is left when the blocks end.
    """
    chunks: list[bytes] = []
    total = 0
    pos = 4
    while len(payload) - pos > 4:
        (size,) = struct.unpack_from("<I", payload, pos)
        pos += 4
        if size == _LZ4_LEGACY_MAGIC:  # concatenated streams restart with the magic
            continue
        if size == 0 or pos + size > len(payload):
            raise ProfileError("lz4 payload truncated (block runs past the end)")
        try:
            block = lz4.block.decompress(payload[pos:pos + size],
                                         uncompressed_size=_LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as exc:
            raise ProfileError(f"lz4 payload corrupt: {exc}") from None
        pos += size
        chunks.append(block)
        total += len(block)
        if total > limit:
            break
    if not chunks:
        raise ProfileError("lz4 payload truncated (no blocks)")
    return _bounded("lz4", b"".join(chunks), True, limit)


_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")


def elf_size(data: bytes) -> int:
    """Bytes the ELF64 image occupies (its headers, segments and sections), checked."""
    if len(data) < _EHDR.size or data[4] != 2 or data[5] != 1:
        raise ProfileError("vmlinux is not a little-endian ELF64 file")
    (_, _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
     _) = _EHDR.unpack_from(data)
    end = _EHDR.size
    if phnum and (phentsize < _PHDR.size or phoff + phnum * phentsize > len(data)):
        raise ProfileError("vmlinux ELF truncated: program headers out of bounds")
    if shnum and (shentsize < _SHDR.size or shoff + shnum * shentsize > len(data)):
        raise ProfileError("vmlinux ELF truncated: section headers out of bounds")
    end = max(end, phoff + phnum * phentsize, shoff + shnum * shentsize)
    for i in range(phnum):
        _, _, offset, _, _, filesz, _, _ = _PHDR.unpack_from(data, phoff + i * phentsize)
        end = max(end, offset + filesz)
    for i in range(shnum):
        _, sh_type, _, _, offset, size, _, _, _, _ = _SHDR.unpack_from(data, shoff + i * shentsize)
        if sh_type != 8:  # SHT_NOBITS occupies no file space
            end = max(end, offset + size)
    if end > len(data):
        raise ProfileError(f"vmlinux ELF truncated: needs {end} bytes, has {len(data)}")
    return int(end)
