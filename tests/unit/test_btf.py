"""The BTF parser on crafted blobs: every kind, layouts, and hostile or truncated input."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vims.vmi.btf import MAX_DEPTH, Btf, Kind, parse_btf
from vims.vmi.errors import ProfileError


class BtfWriter:
    """Assemble a BTF blob type by type, as pahole would (ids from 1)."""

    def __init__(self, order: str = "<") -> None:
        self.order = order
        self.strings = bytearray(b"\0")
        self.records: list[bytes] = []

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: Kind, name: str = "", vlen: int = 0, kflag: bool = False,
            size_type: int = 0, extra: bytes = b"") -> int:
        info = (int(kflag) << 31) | (kind.value << 24) | vlen
        self.records.append(struct.pack(self.order + "III", self.s(name), info, size_type)
                            + extra)
        return len(self.records)

    def u32(self, *values: int) -> bytes:
        return struct.pack(self.order + f"{len(values)}I", *values)

    def int_(self, name: str, size: int, encoding: int = 0, bits: int | None = None,
             offset: int = 0) -> int:
        bits = 8 * size if bits is None else bits
        return self.add(Kind.INT, name, size_type=size,
                        extra=self.u32(encoding << 24 | offset << 16 | bits))

    def ref(self, kind: Kind, target: int, name: str = "") -> int:
        return self.add(kind, name, size_type=target)

    def array(self, elem: int, index: int, count: int) -> int:
        return self.add(Kind.ARRAY, extra=self.u32(elem, index, count))

    def composite(self, name: str, size: int, members: list[tuple[str, int, int, int]],
                  union: bool = False) -> int:
        kflag = any(bits for *_, bits in members)
        extra = b"".join(self.u32(self.s(n), t, (bits << 24 | off) if kflag else off)
                         for n, t, off, bits in members)
        return self.add(Kind.UNION if union else Kind.STRUCT, name, len(members), kflag, size,
                        extra)

    def enum(self, name: str, size: int, values: list[tuple[str, int]],
             signed: bool = False) -> int:
        extra = b"".join(self.u32(self.s(n), v & 0xFFFFFFFF) for n, v in values)
        return self.add(Kind.ENUM, name, len(values), signed, size, extra)

    def enum64(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(self.u32(self.s(n), v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF)
                         for n, v in values)
        return self.add(Kind.ENUM64, name, len(values), signed, 8, extra)

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra = b"".join(self.u32(self.s(n), t) for n, t in params)
        return self.add(Kind.FUNC_PROTO, vlen=len(params), size_type=ret, extra=extra)

    def blob(self, type_len_delta: int = 0) -> bytes:
        types = b"".join(self.records)
        header = struct.pack(self.order + "HBBIIIII", 0xEB9F, 1, 0, 24, 0,
                             len(types) + type_len_delta, len(types), len(self.strings))
        return header + types + bytes(self.strings)


def kernel_like() -> tuple[BtfWriter, dict[str, int]]:
    """A small but kernel-shaped type graph using every BTF kind."""
    w = BtfWriter()
    ids: dict[str, int] = {}
    ids["int"] = w.int_("int", 4, encoding=1)
    ids["uint"] = w.int_("unsigned int", 4)
    ids["char"] = w.int_("char", 1, encoding=1)
    ids["long"] = w.int_("long int", 8, encoding=1)
    ids["bool"] = w.int_("_Bool", 1, encoding=4)
    ptr = len(w.records) + 2  # list_head points at itself through the PTR added next
    ids["list_head"] = w.composite("list_head", 16, [("next", ptr, 0, 0), ("prev", ptr, 64, 0)])
    ids["list_ptr"] = w.ref(Kind.PTR, ids["list_head"])
    ids["pid_t"] = w.ref(Kind.TYPEDEF, ids["int"], "pid_t")
    ids["comm"] = w.array(ids["char"], ids["int"], 16)
    ids["const_char"] = w.ref(Kind.CONST, ids["char"])
    ids["const_char_ptr"] = w.ref(Kind.PTR, ids["const_char"])
    ids["char_ptr"] = w.ref(Kind.PTR, ids["char"])
    ids["char_ptr_const"] = w.ref(Kind.CONST, ids["char_ptr"])
    ids["volatile_int"] = w.ref(Kind.VOLATILE, ids["int"])
    ids["restrict_ptr"] = w.ref(Kind.RESTRICT, ids["char_ptr"])
    ids["fwd_file"] = w.add(Kind.FWD, "file")
    ids["file_ptr"] = w.ref(Kind.PTR, ids["fwd_file"])
    ids["proto"] = w.func_proto(ids["int"], [("f", ids["file_ptr"]), ("n", ids["int"]),
                                             ("", 0)])
    ids["proto_ptr"] = w.ref(Kind.PTR, ids["proto"])
    ids["func"] = w.ref(Kind.FUNC, ids["proto"], "do_thing")
    ids["state"] = w.enum("task_state", 4, [("RUNNING", 0), ("DEAD", -1)], signed=True)
    ids["flags"] = w.enum("flags", 4, [("BIG", 0x80000000)])
    ids["e64"] = w.enum64("wide", [("HUGE", 1 << 40), ("NEG", -2)], signed=True)
    ids["float"] = w.add(Kind.FLOAT, "double", size_type=8)
    ids["tagged"] = w.ref(Kind.TYPE_TAG, ids["char_ptr"], "user")
    # struct { long x; long y; } -- anonymous, flattened into the union below
    ids["anon_xy"] = w.composite("", 16, [("x", ids["long"], 0, 0), ("y", ids["long"], 64, 0)])
    ids["anon_u"] = w.composite("", 16, [("pid", ids["pid_t"], 0, 0),
                                         ("", ids["anon_xy"], 0, 0)], union=True)
    ids["anon_named"] = w.composite("", 8, [("p", ids["int"], 0, 0), ("q", ids["int"], 32, 0)])
    ids["task"] = w.composite("task_struct", 96, [
        ("state", ids["volatile_int"], 0, 0),
        ("flag_a", ids["uint"], 32, 1),
        ("flag_b", ids["uint"], 33, 3),
        ("", ids["int"], 36, 4),  # unnamed padding bitfield
        ("tasks", ids["list_head"], 64, 0),
        ("", ids["anon_u"], 192, 0),
        ("comm", ids["comm"], 320, 0),
        ("pair", ids["anon_named"], 448, 0),
        ("op", ids["proto_ptr"], 512, 0),
        ("name", ids["const_char_ptr"], 576, 0),
        ("state2", ids["state"], 640, 0),
        ("more", ids["e64"], 704, 0),
    ])
    ids["var"] = w.add(Kind.VAR, "init_task", size_type=ids["task"], extra=w.u32(1))
    ids["percpu"] = w.add(Kind.VAR, "runqueues", size_type=ids["int"], extra=w.u32(1))
    ids["datasec"] = w.add(Kind.DATASEC, ".data..percpu", 1, size_type=4,
                           extra=w.u32(ids["percpu"], 0, 4))
    ids["decl_tag"] = w.add(Kind.DECL_TAG, "my_tag", size_type=ids["task"],
                            extra=struct.pack("<i", 2))
    # old-style bitfield: the INT itself carries width and offset
    ids["old_bits"] = w.int_("unsigned int", 4, bits=5, offset=2)
    ids["oldbf"] = w.composite("oldbf", 4, [("b", ids["old_bits"], 8, 0)])
    ids["outer"] = w.composite("outer", 112, [("head", ids["int"], 0, 0),
                                             ("task", ids["task"], 128, 0)])
    return w, ids


@pytest.fixture(scope="module")
def btf() -> tuple[Btf, dict[str, int]]:
    w, ids = kernel_like()
    return parse_btf(w.blob()), ids


def test_every_kind_parses(btf: tuple[Btf, dict[str, int]]) -> None:
    parsed, ids = btf
    kinds = {t.kind for t in parsed.types[1:]}
    assert kinds == set(Kind)
    assert parsed[ids["int"]].int_encoding == 1
    assert parsed[ids["int"]].size == 4
    assert parsed[ids["comm"]].nelems == 16
    assert parsed[ids["var"]].linkage == 1
    assert parsed[ids["datasec"]].secinfos[0].type_id == ids["percpu"]
    assert parsed[ids["decl_tag"]].component_idx == 2
    assert parsed[ids["func"]].name == "do_thing"
    assert parsed[ids["fwd_file"]].kind is Kind.FWD


def test_type_names_render_as_c(btf: tuple[Btf, dict[str, int]]) -> None:
    parsed, ids = btf
    name = parsed.type_name
    assert name(ids["list_ptr"]) == "struct list_head *"
    assert name(ids["comm"]) == "char [16]"
    assert name(ids["pid_t"]) == "pid_t"
    assert name(ids["const_char_ptr"]) == "const char *"
    assert name(ids["char_ptr_const"]) == "char *const"
    assert name(ids["volatile_int"]) == "volatile int"
    assert name(ids["restrict_ptr"]) == "char *restrict"
    assert name(ids["proto_ptr"]) == "int (*)(struct file *, int, ...)"
    assert name(ids["func"]) == "int do_thing(struct file *, int, ...)"
    assert name(ids["state"]) == "enum task_state"
    assert name(ids["anon_u"]) == "union {...}"
    assert name(ids["tagged"]) == "char *"
    assert name(0) == "void"


def test_sizes(btf: tuple[Btf, dict[str, int]]) -> None:
    parsed, ids = btf
    assert parsed.size_of(ids["comm"]) == 16
    assert parsed.size_of(ids["pid_t"]) == 4
    assert parsed.size_of(ids["list_ptr"]) == 8
    assert parsed.size_of(ids["task"]) == 96
    assert parsed.size_of(ids["var"]) == 96
    assert parsed.size_of(ids["proto"]) == 0


def test_anonymous_members_are_flattened(btf: tuple[Btf, dict[str, int]]) -> None:
    parsed, _ = btf
    assert parsed.member("task_struct", "pid").offset == 24
    assert parsed.member("task_struct", "x").offset == 24
    assert parsed.member("task_struct", "y").offset == 32
    assert parsed.member("task_struct", "pair.q").offset == 60  # named member of anonymous type
    assert parsed.member("task_struct", "tasks.prev").offset == 16  # dotted into a named struct
    assert parsed.member("outer", "task.tasks.prev").offset == 16 + 16
    assert parsed.member("outer", "task.pid").offset == 16 + 24
    flat = parsed.flat_members(parsed.composite("task_struct").type_id)
    assert "" not in flat
    assert "pair" in flat
    with pytest.raises(ProfileError, match="no member 'nope'"):
        parsed.member("task_struct", "nope")
    with pytest.raises(ProfileError, match="no member"):
        parsed.member("task_struct", "comm.x")  # comm is an array, not a struct
    with pytest.raises(ProfileError, match="no struct or union"):
        parsed.member("no_such", "x")


def test_bitfields(btf: tuple[Btf, dict[str, int]]) -> None:
    parsed, _ = btf
    a = parsed.member("task_struct", "flag_a")
    b = parsed.member("task_struct", "flag_b")
    assert (a.bit_offset, a.bit_size, a.offset) == (32, 1, 4)
    assert (b.bit_offset, b.bit_size) == (33, 3)
    old = parsed.member("oldbf", "b")
    assert (old.bit_offset, old.bit_size) == (10, 5)


def test_enums(btf: tuple[Btf, dict[str, int]]) -> None:
    parsed, _ = btf
    assert parsed.enum_values("task_state") == {"RUNNING": 0, "DEAD": -1}
    assert parsed.enum_values("flags") == {"BIG": 0x80000000}
    assert parsed.enum_values("wide") == {"HUGE": 1 << 40, "NEG": -2}
    with pytest.raises(ProfileError):
        parsed.enum_values("nope")


def test_big_endian_blob() -> None:
    w = BtfWriter(">")
    i = w.int_("int", 4, encoding=1)
    w.composite("s", 8, [("a", i, 0, 0), ("b", i, 32, 0)])
    parsed = parse_btf(w.blob())
    assert parsed.member("s", "b").offset == 4


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b[:10], "header needs"),
    (lambda b: b"\x00\x00" + b[2:], "not BTF"),
    (lambda b: b[:2] + b"\x02" + b[3:], "version"),
    (lambda b: b[:-5], "truncated"),
])
def test_bad_headers(mutate: object, message: str) -> None:
    w, _ = kernel_like()
    with pytest.raises(ProfileError, match=message):
        parse_btf(mutate(w.blob()))  # type: ignore[operator]


def test_truncated_records_are_refused() -> None:
    w, _ = kernel_like()
    full = w.blob()
    type_len = struct.unpack_from("<I", full, 12)[0]
    for cut in range(1, type_len, 7):
        blob = bytearray(full)
        struct.pack_into("<I", blob, 12, type_len - cut)
        if (type_len - cut) % 4:
            with pytest.raises(ProfileError):
                parse_btf(bytes(blob))
            continue
        messages: list[str] = []
        try:
            parsed = parse_btf(bytes(blob))
        except ProfileError as exc:
            messages.append(str(exc))
        else:  # cut on a record boundary: a valid, shorter blob
            assert len(parsed) < len(kernel_like()[1]) + 1
        assert all("truncated" in m or "refers to type" in m for m in messages)


def test_dangling_reference_and_bad_kind() -> None:
    w = BtfWriter()
    w.ref(Kind.PTR, 42)
    with pytest.raises(ProfileError, match="refers to type 42"):
        parse_btf(w.blob())
    w = BtfWriter()
    w.records.append(struct.pack("<III", 0, 25 << 24, 0))
    with pytest.raises(ProfileError, match="unknown kind 25"):
        parse_btf(w.blob())
    w = BtfWriter()
    w.records.append(struct.pack("<III", 9999, Kind.INT << 24, 4) + w.u32(32))
    with pytest.raises(ProfileError, match="string offset"):
        parse_btf(w.blob())


def test_reference_cycles_are_bounded() -> None:
    w = BtfWriter()
    w.ref(Kind.TYPEDEF, 2, "a")
    w.ref(Kind.CONST, 1)
    w.ref(Kind.PTR, 4)
    w.func_proto(3, [("", 3)])  # int (*)(int (*)(...)) without end
    w.composite("loop", 4, [("", 6, 0, 0)])
    w.composite("", 4, [("", 5, 0, 0)])
    parsed = parse_btf(w.blob())
    with pytest.raises(ProfileError, match=str(MAX_DEPTH)):
        parsed.resolve(1)
    with pytest.raises(ProfileError):
        parsed.size_of(1)
    with pytest.raises(ProfileError):
        parsed.type_name(3)
    with pytest.raises(ProfileError):
        parsed.flat_members(5)


def _exercise(parsed: Btf) -> None:
    for t in parsed.types:
        parsed.type_name(t.type_id)
        parsed.size_of(t.type_id)
        if t.kind in (Kind.STRUCT, Kind.UNION):
            for name in parsed.flat_members(t.type_id):
                if t.name:
                    parsed.member(t.name, name)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_profile_error(data: bytes) -> None:
    blob = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(data) // 2, len(data) // 2,
                       len(data) - len(data) // 2) + data
    for candidate in (data, blob):
        with contextlib.suppress(ProfileError):
            _exercise(parse_btf(candidate))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
                max_size=12))
def test_fuzz_mutated_blob_only_raises_profile_error(flips: list[tuple[int, int]]) -> None:
    w, _ = kernel_like()
    blob = bytearray(w.blob())
    for pos, value in flips:
        blob[pos % len(blob)] = value
    with contextlib.suppress(ProfileError):
        _exercise(parse_btf(bytes(blob)))
