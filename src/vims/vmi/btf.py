"""Parse a kernel's BTF (BPF Type Format) blob: the type layouts the kernel carries itself.

Why BTF: a distribution kernel built with ``CONFIG_DEBUG_INFO_BTF`` keeps every
struct, union and enum of the kernel in its ``.BTF`` section (~4 MB), so a
profile can be built from the vendor's bzImage alone, without the multi-GB
debug package. No maintained Python library parses BTF (bpftool and libbpf are
C; PyPI has nothing usable), so this is a small hand-written parser of the
format documented in the kernel's ``Documentation/bpf/btf.rst``.

The blob is input we do not trust (a file from anywhere, or bytes from guest
memory): every read goes through a bounds-checked cursor, every type reference
is checked, recursion is bounded, and any malformation raises
:class:`~vims.vmi.errors.ProfileError` with a one-line message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from vims.vmi.errors import ProfileError

__all__ = [
    "MAX_DEPTH",
    "Btf",
    "BtfType",
    "Enumerator",
    "FlatMember",
    "Kind",
    "Member",
    "Param",
    "VarSecInfo",
    "parse_btf",
]

BTF_MAGIC = 0xEB9F
HEADER_SIZE = 24
#: Deepest chain of type references followed (typedef -> const -> array -> ...);
#: real kernels stay far below, hostile blobs with cycles hit it.
MAX_DEPTH = 64


class Kind(IntEnum):
    """BTF_KIND_* values (include/uapi/linux/btf.h)."""

    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


_KINDS = {k.value: k for k in Kind}
#: Kinds whose third header word is a size (the others hold a type id there).
_SIZED = frozenset({Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.DATASEC,
                    Kind.FLOAT})
#: Kinds that only qualify or rename another type: skipped to reach the real layout.
_TRANSPARENT = frozenset({Kind.TYPEDEF, Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG})
_QUALIFIER = {Kind.CONST: "const", Kind.VOLATILE: "volatile", Kind.RESTRICT: "restrict"}
COMPOSITE = frozenset({Kind.STRUCT, Kind.UNION})


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a struct or union, offsets in bits from the start of its parent."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 unless the member is a bitfield


@dataclass(frozen=True, slots=True)
class Enumerator:
    name: str
    value: int


@dataclass(frozen=True, slots=True)
class Param:
    """A FUNC_PROTO parameter; a last one with type 0 and no name means ``...``."""

    name: str
    type_id: int


@dataclass(frozen=True, slots=True)
class VarSecInfo:
    """A variable placed in a DATASEC: its VAR type id and offset within the section."""

    type_id: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class BtfType:
    """One BTF type record; which optional fields are set depends on ``kind``.

    ``size`` is meaningful for INT, STRUCT, UNION, ENUM, ENUM64, DATASEC and
    FLOAT; ``ref`` (the referenced type id) for PTR, TYPEDEF, the qualifiers,
    FUNC, FUNC_PROTO (its return type), VAR, DECL_TAG and TYPE_TAG; for ARRAY
    it is the element type.
    """

    type_id: int
    kind: Kind
    name: str
    kind_flag: bool
    vlen: int
    size: int = 0
    ref: int = 0
    int_encoding: int = 0  # INT: 1 signed, 2 char, 4 bool
    int_offset: int = 0
    int_bits: int = 0
    index_type: int = 0  # ARRAY
    nelems: int = 0  # ARRAY
    members: tuple[Member, ...] = ()
    enumerators: tuple[Enumerator, ...] = ()
    params: tuple[Param, ...] = ()
    linkage: int = 0  # VAR (static/global); FUNC keeps it in vlen
    secinfos: tuple[VarSecInfo, ...] = ()
    component_idx: int = -1  # DECL_TAG: -1 for the whole type, else a member/param index


@dataclass(frozen=True, slots=True)
class FlatMember:
    """A member as C code names it, anonymous structs/unions flattened into the parent.

    ``name`` may be dotted (``foo.bar``) for members of an anonymous struct type
    reached through a named member; offsets are in bits from the outer struct.
    """

    name: str
    type_id: int
    bit_offset: int
    bit_size: int  # 0 unless a bitfield

    @property
    def offset(self) -> int:
        """Byte offset of the member (of the byte holding its first bit, for bitfields)."""
        return self.bit_offset // 8


class _Cursor:
    """Bounds-checked reader over a window of a byte buffer."""

    __slots__ = ("_buf", "end", "pos", "what")

    def __init__(self, buf: memoryview, pos: int, end: int, what: str) -> None:
        self._buf = buf
        self.pos = pos
        self.end = end
        self.what = what

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        new = self.pos + fmt.size
        if new > self.end:
            raise ProfileError(f"BTF truncated: {self.what} at byte {self.pos} needs {fmt.size} "
                               f"bytes, {self.end - self.pos} left")
        values: tuple[int, ...] = fmt.unpack_from(self._buf, self.pos)
        self.pos = new
        return values

    def records(self, fmt: struct.Struct, count: int) -> Iterator[tuple[int, ...]]:
        size = fmt.size * count
        if self.pos + size > self.end:
            raise ProfileError(f"BTF truncated: {count} {self.what} records at byte {self.pos} "
                               f"need {size} bytes, {self.end - self.pos} left")
        start, self.pos = self.pos, self.pos + size
        return fmt.iter_unpack(self._buf[start:start + size])


class Btf:
    """All types of one BTF blob, indexed by id (0 is ``void``) and by name."""

    def __init__(self, types: list[BtfType], pointer_size: int = 8) -> None:
        self.types = types
        self.pointer_size = pointer_size
        self._composites: dict[str, int] = {}
        self._enums: dict[str, int] = {}
        self._typedefs: dict[str, int] = {}
        for t in types[1:]:
            if not t.name:
                continue
            if t.kind in COMPOSITE:
                self._composites.setdefault(t.name, t.type_id)
            elif t.kind in (Kind.ENUM, Kind.ENUM64):
                self._enums.setdefault(t.name, t.type_id)
            elif t.kind is Kind.TYPEDEF:
                self._typedefs.setdefault(t.name, t.type_id)
        self._name_cache: dict[int, str] = {}
        self._flat_cache: dict[int, dict[str, FlatMember]] = {}

    def __len__(self) -> int:
        return len(self.types)

    def __getitem__(self, type_id: int) -> BtfType:
        if not 0 <= type_id < len(self.types):
            raise ProfileError(f"BTF type id {type_id} out of range (0..{len(self.types) - 1})")
        return self.types[type_id]

    # -- lookups by name ---------------------------------------------------------------------

    def composite_names(self) -> list[str]:
        """Names of all named structs and unions (first definition of each name)."""
        return list(self._composites)

    def enum_names(self) -> list[str]:
        return list(self._enums)

    def find_composite(self, name: str) -> BtfType | None:
        """The struct or union called ``name`` (also through a typedef such as ``atomic_t``)."""
        tid = self._composites.get(name)
        if tid is None and name in self._typedefs:
            target = self.resolve(self._typedefs[name])
            return target if target.kind in COMPOSITE else None
        return self.types[tid] if tid is not None else None

    def composite(self, name: str) -> BtfType:
        found = self.find_composite(name)
        if found is None:
            raise ProfileError(f"BTF has no struct or union '{name}'")
        return found

    def enum_values(self, name: str) -> dict[str, int]:
        tid = self._enums.get(name)
        if tid is None:
            raise ProfileError(f"BTF has no enum '{name}'")
        return {e.name: e.value for e in self.types[tid].enumerators}

    def find_typedef(self, name: str) -> int | None:
        return self._typedefs.get(name)

    # -- type algebra ------------------------------------------------------------------------

    def resolve(self, type_id: int) -> BtfType:
        """Skip typedefs, qualifiers and type tags down to the type that has the layout."""
        t = self[type_id]
        for _ in range(MAX_DEPTH):
            if t.kind not in _TRANSPARENT:
                return t
            t = self[t.ref] if t.ref else _VOID
        raise ProfileError(f"BTF type {type_id}: reference chain deeper than {MAX_DEPTH}")

    def size_of(self, type_id: int) -> int:
        """Size in bytes of an object of this type (0 for void, functions, forwards)."""
        count = 1
        for _ in range(MAX_DEPTH):
            if type_id == 0:
                return 0
            t = self[type_id]
            if t.kind in _SIZED:
                return count * t.size
            if t.kind is Kind.PTR:
                return count * self.pointer_size
            if t.kind is Kind.ARRAY:
                count *= t.nelems
                type_id = t.ref
            elif t.kind in _TRANSPARENT or t.kind is Kind.VAR:
                type_id = t.ref
            else:
                return 0
        raise ProfileError(f"BTF type {type_id}: reference chain deeper than {MAX_DEPTH}")

    def type_name(self, type_id: int) -> str:
        """The type as a C declaration without a name: ``struct list_head *``, ``char [16]``."""
        cached = self._name_cache.get(type_id)
        if cached is None:
            cached = " ".join(self._declare(type_id, "", 0).split())
            self._name_cache[type_id] = cached
        return cached

    def _declare(self, type_id: int, inner: str, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise ProfileError(f"BTF type {type_id}: declaration nested deeper than {MAX_DEPTH}")
        if type_id == 0:
            return _join("void", inner)
        t = self[type_id]
        kind = t.kind
        if kind in (Kind.INT, Kind.FLOAT, Kind.TYPEDEF):
            return _join(t.name or "?", inner)
        if kind in COMPOSITE:
            tag = "struct" if kind is Kind.STRUCT else "union"
            return _join(f"{tag} {t.name}" if t.name else f"{tag} {{...}}", inner)
        if kind in (Kind.ENUM, Kind.ENUM64):
            return _join(f"enum {t.name}" if t.name else "enum {...}", inner)
        if kind is Kind.FWD:
            return _join(f"{'union' if t.kind_flag else 'struct'} {t.name}", inner)
        if kind is Kind.PTR:
            return self._declare(t.ref, "*" + inner, depth + 1)
        if kind in _QUALIFIER:
            qual = _QUALIFIER[kind]
            if t.ref and self[t.ref].kind is Kind.PTR:
                return self._declare(t.ref, f"{qual} {inner}".rstrip(), depth + 1)
            return f"{qual} {self._declare(t.ref, inner, depth + 1)}"
        if kind is Kind.ARRAY:
            inner = f"({inner})" if inner.startswith("*") else inner
            return self._declare(t.ref, f"{inner}[{t.nelems}]", depth + 1)
        if kind is Kind.FUNC_PROTO:
            inner = f"({inner})" if inner.startswith("*") else inner
            params = ", ".join("..." if p.type_id == 0 and not p.name
                               else " ".join(self._declare(p.type_id, "", depth + 1).split())
                               for p in t.params) or "void"
            return self._declare(t.ref, f"{inner}({params})", depth + 1)
        if kind is Kind.FUNC:
            return self._declare(t.ref, t.name + inner, depth + 1)
        if kind in (Kind.TYPE_TAG, Kind.DECL_TAG, Kind.VAR):
            return self._declare(t.ref, inner, depth + 1)
        return _join(f"SEC {t.name}", inner)  # DATASEC

    # -- members -----------------------------------------------------------------------------

    def member_bits(self, member: Member) -> tuple[int, int]:
        """(bit offset, bit size) of a member; bit size 0 for a plain member.

        Besides ``kind_flag`` bitfields, old encoders put a bitfield's width
        and extra offset in the INT type itself; both are handled.
        """
        if member.bitfield_size:
            return member.bit_offset, member.bitfield_size
        target = self.resolve(member.type_id)
        if target.kind is Kind.INT and (target.int_offset or target.int_bits != 8 * target.size):
            return member.bit_offset + target.int_offset, target.int_bits
        return member.bit_offset, 0

    def flat_members(self, type_id: int) -> dict[str, FlatMember]:
        """Members of a struct/union by C name, anonymous members flattened (cached)."""
        cached = self._flat_cache.get(type_id)
        if cached is not None:
            return cached
        out: dict[str, FlatMember] = {}
        self._flatten(self.resolve(type_id), 0, "", out, 0)
        self._flat_cache[type_id] = out
        return out

    def _flatten(self, t: BtfType, base: int, prefix: str, out: dict[str, FlatMember],
                 depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ProfileError(f"BTF type {t.type_id}: anonymous members nested deeper than "
                               f"{MAX_DEPTH}")
        for m in t.members:
            bit_offset, bit_size = self.member_bits(m)
            bit_offset += base
            target = self.resolve(m.type_id)
            nested = target.kind in COMPOSITE and not target.name
            if not m.name:
                if target.kind in COMPOSITE:
                    self._flatten(target, bit_offset, prefix, out, depth + 1)
                continue  # unnamed padding bitfield
            name = prefix + m.name
            out.setdefault(name, FlatMember(name, m.type_id, bit_offset, bit_size))
            if nested:
                self._flatten(target, bit_offset, name + ".", out, depth + 1)

    def member(self, struct_name: str, path: str) -> FlatMember:
        """Locate ``path`` (``pid``, ``core_layout.base``) in a struct, offsets from its start.

        A dotted path descends into members whose type is a struct or union
        (also through typedefs such as ``spinlock_t``).
        """
        t = self.composite(struct_name)
        bit_base = 0
        for _ in range(MAX_DEPTH):
            flat = self.flat_members(t.type_id)
            hit = flat.get(path)
            if hit is not None:
                return FlatMember(hit.name, hit.type_id, bit_base + hit.bit_offset, hit.bit_size)
            parts = path.split(".")
            for cut in range(len(parts) - 1, 0, -1):
                outer = flat.get(".".join(parts[:cut]))
                if outer is None or outer.bit_size:
                    continue
                target = self.resolve(outer.type_id)
                if target.kind in COMPOSITE:
                    t, bit_base, path = target, bit_base + outer.bit_offset, ".".join(parts[cut:])
                    break
            else:
                raise ProfileError(f"struct {struct_name} has no member '{path}'")
        raise ProfileError(f"struct {struct_name}: member path nested deeper than {MAX_DEPTH}")


_VOID = BtfType(0, Kind.INT, "void", False, 0)


def _join(base: str, inner: str) -> str:
    return f"{base} {inner}" if inner else base


_HEADER = struct.Struct("<HBBIIIII")
_FORMATS = {
    order: {
        "type": struct.Struct(order + "III"),
        "u32": struct.Struct(order + "I"),
        "i32": struct.Struct(order + "i"),
        "array": struct.Struct(order + "III"),
        "member": struct.Struct(order + "III"),
        "enum": struct.Struct(order + "II"),
        "enum64": struct.Struct(order + "III"),
        "param": struct.Struct(order + "II"),
        "secinfo": struct.Struct(order + "III"),
    }
    for order in "<>"
}


class _Strings:
    """The BTF string section: NUL-terminated names looked up by offset.

    All strings are split once up front (names are looked up ~250k times
    for a kernel); an offset into the middle of a string, which the format
    allows, takes the slow path.
    """

    def __init__(self, data: bytes) -> None:
        if data and data[0] != 0:
            raise ProfileError("BTF string section does not start with an empty string")
        self._data = data
        self._cache: dict[int, str] = {}
        pos = 0
        for raw in data.split(b"\0")[:-1]:  # the last piece follows the final NUL
            self._cache[pos] = raw.decode("utf-8", "replace")
            pos += len(raw) + 1

    def __call__(self, offset: int) -> str:
        name = self._cache.get(offset)
        if name is None:
            end = self._data.find(b"\0", offset)
            if offset >= len(self._data) or end < 0:
                raise ProfileError(f"BTF string offset {offset} outside the string section "
                                   f"({len(self._data)} bytes) or unterminated")
            name = self._data[offset:end].decode("utf-8", "replace")
            self._cache[offset] = name
        return name


def parse_btf(blob: bytes, pointer_size: int = 8) -> Btf:
    """Parse a whole (non-split) BTF blob, e.g. a vmlinux's ``.BTF`` section."""
    if len(blob) < HEADER_SIZE:
        raise ProfileError(f"BTF truncated: {len(blob)} bytes, header needs {HEADER_SIZE}")
    magic_le = int.from_bytes(blob[:2], "little")
    if magic_le == BTF_MAGIC:
        order = "<"
    elif int.from_bytes(blob[:2], "big") == BTF_MAGIC:
        order = ">"
    else:
        raise ProfileError(f"not BTF: magic 0x{magic_le:04x}, expected 0x{BTF_MAGIC:04x}")
    header = struct.Struct(order + _HEADER.format[1:])
    _, version, _, hdr_len, type_off, type_len, str_off, str_len = header.unpack_from(blob)
    if version != 1:
        raise ProfileError(f"unsupported BTF version {version}")
    if hdr_len < HEADER_SIZE or hdr_len > len(blob):
        raise ProfileError(f"BTF header length {hdr_len} invalid for a {len(blob)}-byte blob")
    types_start, strs_start = hdr_len + type_off, hdr_len + str_off
    if types_start + type_len > len(blob) or strs_start + str_len > len(blob):
        raise ProfileError(f"BTF truncated: sections end at byte "
                           f"{max(types_start + type_len, strs_start + str_len)}, blob has "
                           f"{len(blob)}")
    if type_len % 4 or types_start % 4:
        raise ProfileError("BTF type section is not 4-byte aligned")
    strings = _Strings(bytes(blob[strs_start:strs_start + str_len]))
    cur = _Cursor(memoryview(blob), types_start, types_start + type_len, "type")
    types = [_VOID]
    fmt = _FORMATS[order]
    while cur.pos < cur.end:
        types.append(_parse_type(cur, len(types), strings, fmt))
    _check_references(types)
    return Btf(types, pointer_size)


def _parse_type(cur: _Cursor, tid: int, name_of: _Strings,
                fmt: dict[str, struct.Struct]) -> BtfType:
    name_off, info, size_type = cur.unpack(fmt["type"])
    raw_kind = (info >> 24) & 0x1F
    kind = _KINDS.get(raw_kind)
    if kind is None:
        raise ProfileError(f"BTF type {tid}: unknown kind {raw_kind}")
    vlen = info & 0xFFFF
    flag = bool(info >> 31)
    name = name_of(name_off)
    size, ref = (size_type, 0) if kind in _SIZED else (0, size_type)
    if kind is Kind.INT:
        (word,) = cur.unpack(fmt["u32"])
        return BtfType(tid, kind, name, flag, vlen, size, ref, int_encoding=(word >> 24) & 0x0F,
                       int_offset=(word >> 16) & 0xFF, int_bits=word & 0xFF)
    if kind is Kind.ARRAY:
        elem, index, nelems = cur.unpack(fmt["array"])
        return BtfType(tid, kind, name, flag, vlen, size, elem, index_type=index, nelems=nelems)
    if kind in COMPOSITE:
        cur.what = "member"
        records = cur.records(fmt["member"], vlen)
        if flag:  # kind_flag: offset word = bitfield size << 24 | bit offset
            members = tuple(Member(name_of(n), t, off & 0xFFFFFF, off >> 24)
                            for n, t, off in records)
        else:
            members = tuple(Member(name_of(n), t, off, 0) for n, t, off in records)
        return BtfType(tid, kind, name, flag, vlen, size, ref, members=members)
    if kind is Kind.ENUM:
        cur.what = "enumerator"
        sign = 1 << 31 if flag else 0  # kind_flag marks a signed enum
        values = tuple(Enumerator(name_of(n), (v ^ sign) - sign)
                       for n, v in cur.records(fmt["enum"], vlen))
        return BtfType(tid, kind, name, flag, vlen, size, ref, enumerators=values)
    if kind is Kind.ENUM64:
        cur.what = "enumerator"
        sign = 1 << 63 if flag else 0
        values = tuple(Enumerator(name_of(n), ((hi << 32 | lo) ^ sign) - sign)
                       for n, lo, hi in cur.records(fmt["enum64"], vlen))
        return BtfType(tid, kind, name, flag, vlen, size, ref, enumerators=values)
    if kind is Kind.FUNC_PROTO:
        cur.what = "parameter"
        params = tuple(Param(name_of(n), t) for n, t in cur.records(fmt["param"], vlen))
        return BtfType(tid, kind, name, flag, vlen, size, ref, params=params)
    if kind is Kind.VAR:
        (linkage,) = cur.unpack(fmt["u32"])
        return BtfType(tid, kind, name, flag, vlen, size, ref, linkage=linkage)
    if kind is Kind.DATASEC:
        cur.what = "datasec"
        infos = tuple(VarSecInfo(t, off, sz) for t, off, sz in cur.records(fmt["secinfo"], vlen))
        return BtfType(tid, kind, name, flag, vlen, size, ref, secinfos=infos)
    if kind is Kind.DECL_TAG:
        (component,) = cur.unpack(fmt["i32"])
        return BtfType(tid, kind, name, flag, vlen, size, ref, component_idx=component)
    return BtfType(tid, kind, name, flag, vlen, size, ref)  # PTR, FWD, TYPEDEF, CV, FUNC, ...


def _check_references(types: list[BtfType]) -> None:
    """Every type id a record mentions must exist, so later walks never index out of range."""
    count = len(types)
    for t in types:
        if t.ref < count and t.index_type < count and \
                all(m.type_id < count for m in t.members) and \
                all(p.type_id < count for p in t.params) and \
                all(s.type_id < count for s in t.secinfos):
            continue
        refs = [t.ref, t.index_type, *(m.type_id for m in t.members),
                *(p.type_id for p in t.params), *(s.type_id for s in t.secinfos)]
        raise ProfileError(f"BTF type {t.type_id} ({t.kind.name}) refers to type {max(refs)}, "
                           f"but only {count - 1} types exist")
