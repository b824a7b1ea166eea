"""Recover the kernel's symbol table from the kallsyms tables inside a vmlinux.

Why: a distribution bzImage ships without a usable System.map and its ELF
symbol table is stripped, but the kernel keeps a compressed copy of all its
symbols for ``/proc/kallsyms``. That copy is what LibVMI's System.map and the
checks' addresses are built from.

Why our own parser and not PyPI ``vmlinux-to-elf``: that tool reconstructs a
whole ELF and guesses the architecture and table layout by trial, which is
slow in pure Python; for the x86_64 kernels VIMS targets the tables can be
located exactly, and each candidate layout is checked end to end before use.

Layout (``scripts/kallsyms.c``), all tables 8-byte aligned in ``.rodata``:

- ``kallsyms_offsets``: one 32-bit word per symbol, relative to
  ``kallsyms_relative_base`` (with ``CONFIG_KALLSYMS_ABSOLUTE_PERCPU``, used on
  x86_64 SMP, a non-negative word is an absolute per-CPU offset and a negative
  one means ``relative_base - 1 - word``);
- ``kallsyms_num_syms``; ``kallsyms_names``: per symbol a length (one byte, or
  two as ULEB128 for "big" symbols) then that many token indexes;
- ``kallsyms_markers``: the offset in ``names`` of every 256th symbol;
- ``kallsyms_seqs_of_names`` (6.2+, backported to 6.1.y): 3 bytes per symbol;
- ``kallsyms_token_table``: 256 NUL-terminated token strings;
  ``kallsyms_token_index``: 256 16-bit offsets into the token table.

Up to 6.3 the order is offsets, relative_base, num_syms, names, markers,
[seqs], token_table, token_index; later kernels put offsets and relative_base
after token_index. Both are tried. The token table is found by its run of
single-digit tokens ``0``..``9`` (as vmlinux-to-elf does), and the relative
base is the lowest kernel text address.
"""

from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass

from vims.vmi.errors import ProfileError

__all__ = ["Kallsyms", "parse_kallsyms"]

MAX_SYMBOLS = 4 << 20
_DIGITS = re.compile(re.escape(b"\x000\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00"))
_TYPE_LETTERS = frozenset(b"AaBbCcDdGgNnPpRrSsTtUuVvWw?")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Kallsyms:
    """All symbols in kallsyms order (by address), unrelocated (as linked, before KASLR).

    Names can repeat (static functions of the same name in several files);
    :meth:`by_name` keeps the first, lowest one, as ``kallsyms_lookup_name``
    does.
    """

    names: list[str]
    addresses: list[int]
    types: str  # one nm-style letter per symbol: T text, D data, R rodata, B bss, A absolute ...
    relative_base: int

    def __len__(self) -> int:
        return len(self.names)

    def by_name(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, addr in zip(self.names, self.addresses, strict=True):
            out.setdefault(name, addr)
        return out

    def types_by_name(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, letter in zip(self.names, self.types, strict=True):
            out.setdefault(name, letter)
        return out


def _align8(pos: int) -> int:
    return (pos + 7) & ~7


def _find_token_table(data: bytes) -> tuple[int, list[bytes], int]:
    """(token_table offset, the 256 tokens, end of token_index) or ProfileError."""
    for match in _DIGITS.finditer(data):
        digit0 = match.start() + 1
        start = digit0
        for _ in range(ord("0")):  # walk back over the tokens for bytes 0x00..0x2f
            prev = data.rfind(b"\0", 0, start - 1)
            if prev < 0 or prev + 1 >= start - 1:
                break
            start = prev + 1
        else:
            offsets: list[int] = []
            pos = start
            for _ in range(256):
                end = data.find(b"\0", pos, pos + 256)
                if end <= pos:
                    break
                offsets.append(pos - start)
                pos = end + 1
            else:
                index = _align8(pos)
                if index + 512 <= len(data) and \
                        list(struct.unpack_from("<256H", data, index)) == offsets:
                    tokens = [data[start + o:data.index(b"\0", start + o)] for o in offsets]
                    return start, tokens, index + 512
    raise ProfileError("kallsyms token table not found (kernel built without CONFIG_KALLSYMS?)")


def _decode_names(data: bytes, pos: int, count: int, limit: int,
                  tokens: list[bytes]) -> tuple[list[bytes], list[int], int] | None:
    """Decode ``count`` names from ``pos``; None if they do not fit before ``limit``.

    Returns the names, the offset of every 256th name (what kallsyms_markers
    must hold) and the end position.
    """
    names: list[bytes] = []
    markers: list[int] = []
    start = pos
    lookup = tokens.__getitem__
    for i in range(count):
        if pos >= limit:
            return None
        if not i & 0xFF:
            markers.append(pos - start)
        length = data[pos]
        pos += 1
        if length & 0x80:  # "big" symbol: ULEB128 length over two bytes
            if pos >= limit:
                return None
            length = (length & 0x7F) | (data[pos] << 7)
            pos += 1
        if length == 0 or pos + length > limit:
            return None
        names.append(b"".join(map(lookup, data[pos:pos + length])))
        pos += length
    return names, markers, pos


def _markers_match(data: bytes, pos: int, expected: list[int], limit: int) -> bool:
    """kallsyms_markers as 32-bit (6.1+) or 64-bit (older) words equal ``expected``."""
    for width, fmt in ((4, "<%dI"), (8, "<%dQ")):
        if pos + width * len(expected) <= limit and \
                list(struct.unpack_from(fmt % len(expected), data, pos)) == expected:
            return True
    return False


def _symbols_from(data: bytes, num_pos: int, offsets_pos: int, base: int, limit: int,
                  tokens: list[bytes]) -> Kallsyms | None:
    """Build the table if every piece checks out at these positions, else None."""
    (count,) = _U32.unpack_from(data, num_pos)
    if not 0 < count <= MAX_SYMBOLS or offsets_pos < 0 or offsets_pos + 4 * count > len(data):
        return None
    decoded = _decode_names(data, num_pos + 8, count, limit, tokens)
    if decoded is None:
        return None
    raw_names, markers, end = decoded
    if not _markers_match(data, _align8(end), markers, limit):
        return None
    if any(not n or n[0] not in _TYPE_LETTERS for n in raw_names):
        return None
    offsets = struct.unpack_from(f"<{count}i", data, offsets_pos)
    absolute_percpu = sum(o < 0 for o in offsets) > count // 2
    if absolute_percpu:
        addresses = [o if o >= 0 else base - 1 - o for o in offsets]
    else:
        addresses = [base + (o & 0xFFFFFFFF) for o in offsets]
    unsorted = sum(a > b for a, b in itertools.pairwise(addresses))
    if unsorted > count // 100:  # kallsyms is sorted by address; a wrong guess is not
        return None
    text = [n.decode("latin-1") for n in raw_names]
    return Kallsyms(names=[n[1:] for n in text], addresses=addresses,
                    types="".join(n[0] for n in text), relative_base=base)


def parse_kallsyms(data: bytes, text_base: int) -> Kallsyms:
    """Find and decode the kallsyms tables in a vmlinux image.

    ``text_base`` is the lowest kernel text address (the start of ``.text``,
    e.g. 0xffffffff81000000), which kallsyms uses as its relative base.
    """
    token_table, tokens, index_end = _find_token_table(data)
    needle = _U64.pack(text_base)
    pos = data.find(needle)
    while pos >= 0:
        # Layout up to 6.3: ... offsets | relative_base | num_syms | names | ... | tokens
        (count,) = _U32.unpack_from(data, pos + 8) if pos + 12 <= len(data) else (0,)
        if 0 < count <= MAX_SYMBOLS:
            offsets_pos = pos - _align8(4 * count)
            found = _symbols_from(data, pos + 8, offsets_pos, text_base, token_table, tokens)
            if found is not None:
                return found
        # Later layout: num_syms | names | markers | tokens | token_index | offsets | base
        offsets_pos = _align8(index_end)
        words = (pos - offsets_pos) // 4
        for count in (words, words - 1):  # an odd count leaves 4 bytes of alignment padding
            if not 0 < count <= MAX_SYMBOLS:
                continue
            num_pos = data.rfind(_U32.pack(count) + b"\0\0\0\0", 0, token_table)
            if num_pos >= 0:
                found = _symbols_from(data, num_pos, offsets_pos, text_base, token_table,
                                      tokens)
                if found is not None:
                    return found
        pos = data.find(needle, pos + 1)
    raise ProfileError(f"kallsyms tables not found next to the token table (relative base "
                       f"0x{text_base:x}); unsupported kallsyms layout")
