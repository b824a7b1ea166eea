"""Export a Volatility 3 symbol table (ISF) built from BTF and kallsyms.

Why: Volatility 3 is the reference tool forensic analysts trust; an ISF made
from the same kernel image as the VIMS profile lets them (and our tests)
cross-check what VIMS reports, without dwarf2json and the debug package.

Contents (ISF format 6.2.0, what volatility3 2.28 reads):

- ``metadata``: producer, format, and the kernel image's SHA-256;
- ``base_types``: BTF's integer and float types, ``pointer`` and ``void``;
- ``user_types``: every BTF struct/union; anonymous members are emitted as
  ``"anonymous": true`` fields, which volatility flattens into the parent;
  anonymous types are named ``unnamed_<kind>_<btf id>`` (or after the typedef
  that names them, e.g. ``atomic_t``); bitfields are described relative to
  their storage unit, as volatility expects;
- ``enums``; ``symbols``: all kallsyms names with unrelocated addresses;
  ``linux_banner`` carries the banner as ``constant_data``, which is how
  volatility matches an ISF to the kernel in memory.

BTF describes types, not ordinary global variables, so symbol types come
from BTF's per-CPU ``DATASEC`` variables plus a curated table of the globals
volatility's Linux plugins read (:data:`GLOBAL_TYPES`): ``init_task``,
``init_mm``, ``init_files``, ``modules``, ``module_kset``, ``mod_tree``,
``sys_call_table``, ``taint_flags``, ``tk_core``, ``ftrace_ops_list``,
``prog_idr`` and more. Array lengths are
taken from the image (``taint_flags``: entries validated in the data) or from
BTF (``sys_call_table``: ``nr_syscalls``).

Working invocation (tested with volatility3 2.28.2 on the live lab RAM file):
put the ISF in a directory of its own (any depth; the file name must end in
``.json``, ``.json.xz`` or ``.json.gz``) and pass that directory with ``-s``.
Volatility finds the ISF by scanning memory for the ``linux_banner`` bytes,
then locates ``init_task`` (KASLR) by itself. ``--offline`` stops it looking
for ISFs on the network; a private ``--cache-path`` keeps runs independent of
``~/.cache/volatility3``::

    vims profile build --kernel vmlinuz --out P.json --isf ISF/linux/vmlinux.json.xz
    vol -q --offline --cache-path CACHE -s ISF -f /dev/shm/vims-NAME.ram linux.pslist
    vol -q --offline --cache-path CACHE -s ISF -f /dev/shm/vims-NAME.ram linux.lsmod
    vol -q --offline --cache-path CACHE -s ISF -f /dev/shm/vims-NAME.ram \
        linux.malware.check_syscall

(``linux.check_syscall`` is the deprecated name of the last one and works too.)
The first run with a new cache takes ~60 s (volatility hashes and validates the
10 MB ISF against its schema, then caches that); later runs take ~7 s.
Known volatility limits, not ISF defects: check_syscall sizes the table itself
(``__syscall_meta__`` count, 430 here, not ``__NR_syscalls`` = 451), and
lsmod prints load parameters as None under KASLR (2.28.2 reads them without
``absolute=True``).
"""

from __future__ import annotations

import base64
import gzip
import json
import lzma
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vims import __version__
from vims.vmi.btf import COMPOSITE, Btf, BtfType, Kind
from vims.vmi.errors import ProfileError
from vims.vmi.profile import KernelAnalysis

__all__ = ["GLOBAL_TYPES", "ISF_FORMAT", "build_isf", "write_isf"]

ISF_FORMAT = "6.2.0"
Desc = dict[str, Any]
_VOID: Desc = {"kind": "base", "name": "void"}
_FUNCTION: Desc = {"kind": "function"}
#: Standard C spellings volatility code sometimes asks for, mapped to BTF's (DWARF's) names.
_ALIASES = {
    "unsigned long": "long unsigned int", "long": "long int",
    "unsigned long long": "long long unsigned int", "long long": "long long int",
    "unsigned short": "short unsigned int", "short": "short int", "bool": "_Bool",
}
#: (size, signed) -> the base type an enum of that size is stored as.
_ENUM_BASES = {(1, False): "unsigned char", (1, True): "signed char",
               (2, False): "short unsigned int", (2, True): "short int",
               (4, False): "unsigned int", (4, True): "int",
               (8, False): "long long unsigned int", (8, True): "long long int"}


class _Builder:
    """Turns BTF types into ISF type descriptors and user types, naming anonymous ones."""

    def __init__(self, analysis: KernelAnalysis) -> None:
        self.analysis = analysis
        self.btf: Btf = analysis.btf
        self.names: dict[int, str] = {}  # BTF id of a composite/enum -> its ISF name
        self.user_types: dict[str, Desc] = {}
        self.enums: dict[str, Desc] = {}
        self.base_types: dict[str, Desc] = {
            "void": {"kind": "void", "size": 0, "signed": False, "endian": "little"},
            "pointer": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
        }
        self._descs: dict[int, Desc] = {}
        self._name_types()

    # -- naming ------------------------------------------------------------------------------

    def _name_types(self) -> None:
        btf = self.btf
        taken: dict[str, int] = {}
        typedef_names: dict[int, str] = {}
        for t in btf.types[1:]:
            if t.kind is Kind.TYPEDEF and t.ref and not btf[t.ref].name:
                typedef_names.setdefault(t.ref, t.name)
        for t in btf.types[1:]:
            if t.kind in COMPOSITE or t.kind in (Kind.ENUM, Kind.ENUM64):
                kind = "enum" if t.kind in (Kind.ENUM, Kind.ENUM64) else t.kind.name.lower()
                name = t.name or typedef_names.get(t.type_id) or f"unnamed_{kind}_{t.type_id}"
                first = taken.get(name)
                if first is not None and not self._same_layout(btf[first], t):
                    name = f"{name}__btf{t.type_id}"  # a same-named, different local type
                taken.setdefault(name, t.type_id)
                self.names[t.type_id] = name
            elif t.kind in (Kind.INT, Kind.FLOAT):
                self.base_types.setdefault(t.name, self._base(t))
        for alias, name in _ALIASES.items():
            if name in self.base_types:
                self.base_types.setdefault(alias, self.base_types[name])
        for (size, signed), name in _ENUM_BASES.items():
            self.base_types.setdefault(name, {"kind": "int", "size": size, "signed": signed,
                                              "endian": "little"})

    @staticmethod
    def _same_layout(a: BtfType, b: BtfType) -> bool:
        return a.kind == b.kind and a.size == b.size and \
            [m.name for m in a.members] == [m.name for m in b.members] and \
            [e.name for e in a.enumerators] == [e.name for e in b.enumerators]

    @staticmethod
    def _base(t: BtfType) -> Desc:
        if t.kind is Kind.FLOAT:
            kind, signed = "float", True
        elif t.int_encoding & 4:
            kind, signed = "bool", False
        else:
            kind = "char" if t.int_encoding & 2 or "char" in t.name else "int"
            signed = bool(t.int_encoding & 1)
        return {"kind": kind, "size": t.size, "signed": signed, "endian": "little"}

    # -- descriptors -------------------------------------------------------------------------

    def desc(self, type_id: int) -> Desc:
        """The ISF type descriptor of a BTF type (typedefs and qualifiers see-through)."""
        cached = self._descs.get(type_id)
        if cached is not None:
            return cached
        t = self.btf.resolve(type_id)
        kind = t.kind
        if t.type_id == 0:
            out = _VOID
        elif kind in (Kind.INT, Kind.FLOAT):
            out = {"kind": "base", "name": t.name}
        elif kind is Kind.PTR:
            target = self.btf.resolve(t.ref)
            out = {"kind": "pointer",
                   "subtype": _FUNCTION if target.kind in (Kind.FUNC_PROTO, Kind.FUNC)
                   else self.desc(t.ref)}
        elif kind is Kind.ARRAY:
            out = {"kind": "array", "count": t.nelems, "subtype": self.desc(t.ref)}
        elif kind in COMPOSITE:
            out = {"kind": kind.name.lower(), "name": self.names[t.type_id]}
        elif kind in (Kind.ENUM, Kind.ENUM64):
            if t.enumerators:
                out = {"kind": "enum", "name": self.names[t.type_id]}
            else:  # a forward-declared enum: only its size is known
                out = {"kind": "base", "name": _ENUM_BASES.get((t.size, False), "unsigned int")}
        elif kind is Kind.FWD:
            name = t.name
            self.user_types.setdefault(name, {"kind": "union" if t.kind_flag else "struct",
                                              "size": 0, "fields": {}})
            out = {"kind": "union" if t.kind_flag else "struct", "name": name}
        elif kind in (Kind.FUNC_PROTO, Kind.FUNC):
            out = _FUNCTION
        else:
            out = self.desc(t.ref)
        self._descs[type_id] = out
        return out

    def field(self, type_id: int, bit_offset: int, bit_size: int) -> Desc:
        """A struct field; bitfields relative to their aligned storage unit, as volatility reads."""
        if not bit_size:
            return {"offset": bit_offset // 8, "type": self.desc(type_id)}
        unit = max(1, self.btf.size_of(type_id))
        start = bit_offset // (8 * unit) * unit
        if bit_offset - 8 * start + bit_size > 8 * unit:  # packed: straddles its unit
            start = bit_offset // 8
        return {"offset": start, "type": {"kind": "bitfield",
                                          "bit_position": bit_offset - 8 * start,
                                          "bit_length": bit_size, "type": self.desc(type_id)}}

    # -- tables ------------------------------------------------------------------------------

    def build_types(self) -> None:
        btf = self.btf
        for t in btf.types[1:]:
            if t.kind in COMPOSITE:
                name = self.names[t.type_id]
                if name in self.user_types and self.user_types[name]["size"]:
                    continue  # a duplicate of a layout already emitted
                self.user_types[name] = {"kind": t.kind.name.lower(), "size": t.size,
                                         "fields": self._fields(t)}
            elif t.kind in (Kind.ENUM, Kind.ENUM64) and t.enumerators:
                name = self.names[t.type_id]
                signed = any(e.value < 0 for e in t.enumerators)
                self.enums.setdefault(name, {
                    "size": t.size, "base": _ENUM_BASES.get((t.size, signed), "unsigned int"),
                    "constants": {e.name: e.value for e in t.enumerators}})

    def _fields(self, t: BtfType) -> dict[str, Desc]:
        fields: dict[str, Desc] = {}
        for m in t.members:
            bit_offset, bit_size = self.btf.member_bits(m)
            target = self.btf.resolve(m.type_id)
            if not m.name:
                if target.kind in COMPOSITE:
                    name = self.names[target.type_id]
                    fields[name] = {"offset": bit_offset // 8, "anonymous": True,
                                    "type": {"kind": target.kind.name.lower(), "name": name}}
                continue  # unnamed padding bitfield
            fields.setdefault(m.name, self.field(m.type_id, bit_offset, bit_size))
        return fields

    def struct(self, name: str) -> Desc | None:
        t = self.btf.find_composite(name)
        return self.desc(t.type_id) if t is not None else None

    def typedef(self, name: str) -> Desc | None:
        tid = self.btf.find_typedef(name)
        return self.desc(tid) if tid is not None else None


def _array(subtype: Desc | None, count: int) -> Desc | None:
    return {"kind": "array", "count": count, "subtype": subtype} if subtype and count > 0 else None


def _pointer(subtype: Desc | None) -> Desc | None:
    return {"kind": "pointer", "subtype": subtype} if subtype else None


def _base(name: str) -> Callable[[_Builder], Desc | None]:
    return lambda b: {"kind": "base", "name": name} if name in b.base_types else None


def _struct(name: str) -> Callable[[_Builder], Desc | None]:
    return lambda b: b.struct(name)


def _taint_flags(b: _Builder) -> Desc | None:
    """``struct taint_flag taint_flags[TAINT_FLAGS_COUNT]``; the count is not in BTF.

    The entries are read from the image (they are const data): two printable
    letters and a 0/1 ``module`` flag each; the count is where that stops.
    """
    t = b.btf.find_composite("taint_flag")
    addr = b.analysis.symbols.get("taint_flags")
    if t is None or addr is None or t.size < 3:
        return None
    try:
        raw = b.analysis.image.read(addr, 64 * t.size)
    except ProfileError:
        return None
    count = 0
    while count < 64:
        c_true, c_false, module = raw[count * t.size:count * t.size + 3]
        if not (0x21 <= c_true < 0x7F and 0x20 <= c_false < 0x7F and module in (0, 1)):
            break
        count += 1
    return _array(b.desc(t.type_id), count)


def _sys_call_table(b: _Builder) -> Desc | None:
    return _array(_pointer(_FUNCTION), b.analysis.nr_syscalls)


def _gap_array(symbol: str, element: Callable[[_Builder], Desc | None], size: int,
               ) -> Callable[[_Builder], Desc | None]:
    """An array sized by the gap to the next symbol (an upper bound: padding included)."""
    def build(b: _Builder) -> Desc | None:
        addr = b.analysis.symbols.get(symbol)
        if addr is None:
            return None
        after = [a for a in b.analysis.kallsyms.addresses if a > addr]
        return _array(element(b), (min(after) - addr) // size if after else 0)
    return build


def _tk_core(b: _Builder) -> Desc | None:
    """``static struct { seqcount_raw_spinlock_t seq; struct timekeeper timekeeper; } tk_core``.

    The anonymous struct is not in BTF; it is rebuilt here (``timekeeper``
    holds 64-bit members, so it starts at the next 8-byte boundary).
    """
    seq = b.btf.find_typedef("seqcount_raw_spinlock_t")
    keeper = b.btf.find_composite("timekeeper")
    if seq is None or keeper is None:
        return None
    offset = (b.btf.size_of(seq) + 7) // 8 * 8
    b.user_types["vims_tk_core"] = {"kind": "struct", "size": offset + keeper.size, "fields": {
        "seq": {"offset": 0, "type": b.desc(seq)},
        "timekeeper": {"offset": offset, "type": b.desc(keeper.type_id)}}}
    return {"kind": "struct", "name": "vims_tk_core"}


#: Types of global variables (BTF has none for them), by symbol name.
GLOBAL_TYPES: dict[str, Callable[[_Builder], Desc | None]] = {
    "init_task": _struct("task_struct"),
    "init_mm": _struct("mm_struct"),
    "init_files": _struct("files_struct"),
    "init_fs": _struct("fs_struct"),
    "init_nsproxy": _struct("nsproxy"),
    "init_pid_ns": _struct("pid_namespace"),
    "init_uts_ns": _struct("uts_namespace"),
    "init_user_ns": _struct("user_namespace"),
    "init_cred": _struct("cred"),
    "init_net": _struct("net"),
    "net_namespace_list": _struct("list_head"),
    "modules": _struct("list_head"),
    "mod_tree": _struct("mod_tree_root"),
    "module_kset": lambda b: _pointer(b.struct("kset")),
    "sys_call_table": _sys_call_table,
    "taint_flags": _taint_flags,
    "tainted_mask": _base("long unsigned int"),
    "tk_core": _tk_core,
    "cap_last_cap": _base("int"),
    "nr_threads": _base("int"),
    "pid_max": _base("int"),
    "jiffies": _base("long unsigned int"),
    "jiffies_64": _base("long long unsigned int"),
    "page_offset_base": _base("long unsigned int"),
    "vmalloc_base": _base("long unsigned int"),
    "vmemmap_base": _base("long unsigned int"),
    "phys_base": _base("long unsigned int"),
    "max_pfn": _base("long unsigned int"),
    "mem_section": lambda b: _pointer(_pointer(b.struct("mem_section"))),
    "init_top_pgt": lambda b: _array(b.typedef("pgd_t"), 512),
    "idt_table": lambda b: _array(b.struct("gate_struct"), 256),
    "ftrace_ops_list": lambda b: _pointer(b.struct("ftrace_ops")),
    "ftrace_list_end": _struct("ftrace_ops"),
    "prog_idr": _struct("idr"),
    "link_idr": _struct("idr"),
    "__per_cpu_offset": _gap_array("__per_cpu_offset", _base("long unsigned int"), 8),
    "_text": _base("char"),
    "_stext": _base("char"),
    "_etext": _base("char"),
    "_sdata": _base("char"),
    "_edata": _base("char"),
    "_end": _base("char"),
}


def build_isf(analysis: KernelAnalysis) -> dict[str, Any]:
    """The ISF document (a JSON-able dict) for one analysed kernel."""
    b = _Builder(analysis)
    b.build_types()
    symbols: dict[str, Desc] = {name: {"address": addr} for name, addr in analysis.symbols.items()}
    for t in b.btf.types[1:]:  # per-CPU variables: BTF keeps their types
        if t.kind is Kind.VAR and t.name in symbols:
            symbols[t.name]["type"] = b.desc(t.ref)
    for name, make in GLOBAL_TYPES.items():
        if name in symbols:
            desc = make(b)
            if desc is not None:
                symbols[name]["type"] = desc
    banner = analysis.banner.encode() + b"\n"
    if "linux_banner" in symbols:
        symbols["linux_banner"]["type"] = _array({"kind": "base", "name": "char"},
                                                 len(banner) + 1)
        symbols["linux_banner"]["constant_data"] = base64.b64encode(banner).decode()
    return {
        "metadata": {
            "format": ISF_FORMAT,
            "producer": {"name": "vims", "version": __version__,
                         "datetime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())},
            "linux": {"symbols": [{"kind": "symtab", "name": analysis.kernel_path.name,
                                   "hash_type": "sha256",
                                   "hash_value": analysis.kernel_sha256}]},
        },
        "base_types": b.base_types,
        "user_types": b.user_types,
        "enums": b.enums,
        "symbols": symbols,
    }


def write_isf(analysis: KernelAnalysis, path: Path) -> dict[str, int]:
    """Write the ISF as JSON (``.json``), xz (``.json.xz``) or gzip (``.json.gz``).

    Returns counts for a summary. xz uses a fast preset: the file is read
    once per volatility cache update, and build time matters more.
    """
    name = path.name
    if not name.endswith((".json", ".json.xz", ".json.gz")):
        raise ProfileError(f"{path}: an ISF file must end in .json, .json.xz or .json.gz "
                           "(volatility only looks for those)")
    doc = build_isf(analysis)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    if name.endswith(".xz"):
        raw = lzma.compress(raw, preset=1)
    elif name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)
    return {"user_types": len(doc["user_types"]), "enums": len(doc["enums"]),
            "symbols": len(doc["symbols"]), "bytes": len(raw)}

