"""Netfilter hooks of every network namespace, read from guest memory.

KoviD and Reptile register a netfilter hook that watches for a "magic packet"
and starts a shell. Each namespace keeps, per family and hook point, a
``struct nf_hook_entries`` (a u16 count, then ``{hook, priv}`` pairs) in
``net->nf.hooks_<family>[]``; netdev hooks hang off each device
(``nf_hooks_ingress``/``nf_hooks_egress``). Namespaces are on
``net_namespace_list``, devices on ``net->dev_base_head``. Bounded walks.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from vims.vmi.linux import WalkError, is_kernel_pointer, list_for_each
from vims.vmi.memory import GuestMemory

MAX_NETNS = 4096
MAX_DEVICES = 4096
MAX_HOOK_ENTRIES = 1024
FAMILIES = ("ipv4", "ipv6", "arp", "bridge")
NETDEV_HOOKS = ("nf_hooks_ingress", "nf_hooks_egress")


@dataclass(frozen=True)
class NfHook:
    netns: int  # the namespace's inode number, as /proc/PID/ns/net shows it
    family: str  # ipv4, ipv6, arp, bridge, or netdev
    hooknum: int  # NF_INET_PRE_ROUTING.. for inet families; 0 ingress, 1 egress for netdev
    func: int
    priv: int
    device: str = ""


def _entries(mem: GuestMemory, ptr: int) -> list[tuple[int, int]]:
    if not is_kernel_pointer(ptr):
        raise WalkError("netfilter hook entries outside kernel space", ptr)
    count = struct.unpack("<H", mem.read(ptr, 2))[0]
    if count > MAX_HOOK_ENTRIES:
        raise WalkError(f"{count} netfilter hook entries", ptr)
    if not count:
        return []
    hooks_off = mem.profile.offset("nf_hook_entries", "hooks")
    raw = mem.read(ptr + hooks_off, 16 * count)
    return [struct.unpack_from("<QQ", raw, 16 * i) for i in range(count)]


def _array_length(type_name: str) -> int:
    found = re.search(r"\[(\d+)\]$", type_name)
    return int(found.group(1)) if found else 0


def netfilter_hooks(mem: GuestMemory) -> list[NfHook]:
    """Every netfilter hook entry of every namespace and device."""
    p = mem.profile
    if not (p.has_symbol("net_namespace_list") and p.has_member("net", "nf")):
        return []
    list_off, nf_off = p.offset("net", "list"), p.offset("net", "nf")
    inum_off = p.offset("net", "ns") + p.offset("ns_common", "inum")
    dev_head_off = p.offset("net", "dev_base_head")
    dev_list_off = p.offset("net_device", "dev_list")
    out = []
    for node in list_for_each(mem, mem.sym("net_namespace_list"), MAX_NETNS):
        net = node - list_off
        inum = mem.u32(net + inum_off)
        for family in FAMILIES:
            member = f"hooks_{family}"
            if not p.has_member("netns_nf", member):
                continue
            n = _array_length(p.member_type("netns_nf", member))
            base = net + nf_off + p.offset("netns_nf", member)
            for hooknum, ptr in enumerate(struct.unpack(f"<{n}Q", mem.read(base, 8 * n))):
                if ptr:
                    out += [NfHook(inum, family, hooknum, f, d) for f, d in _entries(mem, ptr)]
        present = [h for h in NETDEV_HOOKS if p.has_member("net_device", h)]
        if not present:
            continue
        for dev_node in list_for_each(mem, net + dev_head_off, MAX_DEVICES):
            dev = dev_node - dev_list_off
            name = mem.cstr(dev + p.offset("net_device", "name"), 16)
            for hooknum, member in enumerate(NETDEV_HOOKS):
                if member not in present:
                    continue
                ptr = mem.u64(dev + p.offset("net_device", member))
                if ptr:
                    out += [NfHook(inum, "netdev", hooknum, f, d, name)
                            for f, d in _entries(mem, ptr)]
    return out
