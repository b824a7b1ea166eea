"""Patch sites of kernel text hold only their legitimate encodings (pure logic).

The real guest proves it in tests/integration/test_hooks.py; these pin each
encoding rule, including the ones the lab guest never exercises.
"""

from __future__ import annotations

import struct

import pytest

from vims.vmi.ktext import (
    NOP2,
    NOP5,
    PatchSite,
    Site,
    SiteChange,
    TextLayout,
    build_layout,
    compare_text,
    judge_site,
)

SITE = 0xFFFFFFFF81001000
KERNEL = (0xFFFFFFFF81000000, 0xFFFFFFFF82000000)
CALLERS = {0xFFFFFFFF81076660, 0xFFFFFFFF81076730}
TRAMPOLINE = 0xFFFFFFFFC0200000  # an ftrace ops' trampoline, accounted for by the walk
UNOWNED = 0xFFFFFFFFC0300000  # module area memory no module owns


def rel(opcode: int, site: int, target: int, length: int = 5) -> bytes:
    if length == 2:
        return bytes([opcode]) + struct.pack("<b", target - site - 2)
    return bytes([opcode]) + struct.pack("<i", target - site - 5)


def judge(kind: Site, found: bytes, expected: bytes | None = None, jump_target: int = 0,
          ftrace: set[int] | None = None) -> str | None:
    change = SiteChange(0, kind, expected or bytes(len(found)), found, 0)
    targets = CALLERS | (ftrace or set())
    return judge_site(change, SITE, jump_target, lambda a: KERNEL[0] <= a < KERNEL[1],
                      lambda a: a in targets)


def test_an_fentry_site_may_hold_a_nop_or_a_call_to_ftrace() -> None:
    assert judge(Site.FTRACE, NOP5) is None
    assert judge(Site.FTRACE, rel(0xE8, SITE, min(CALLERS))) is None
    assert judge(Site.FTRACE, rel(0xE8, SITE, TRAMPOLINE), ftrace={TRAMPOLINE}) is None


@pytest.mark.parametrize("found", [
    rel(0xE9, SITE, UNOWNED),  # the inline hook: jmp hook over the fentry NOP
    rel(0xE8, SITE, UNOWNED),  # a call into memory the ftrace walk does not account for
    rel(0xE8, SITE, KERNEL[0] + 0x1234),  # a call to some other kernel function
    bytes.fromhex("cccccccccc"),
])
def test_an_fentry_site_refuses_anything_else(found: bytes) -> None:
    assert judge(Site.FTRACE, found) is not None


def test_a_jump_label_may_jump_only_to_its_own_target() -> None:
    own = SITE + 0x40
    assert judge(Site.JUMP_LABEL, NOP5) is None
    assert judge(Site.JUMP_LABEL, rel(0xE9, SITE, own), jump_target=own) is None
    assert judge(Site.JUMP_LABEL, rel(0xE9, SITE, own + 8), jump_target=own) is not None
    assert judge(Site.JUMP_LABEL, rel(0xE8, SITE, own), jump_target=own) is not None
    # The short form: a 2-byte NOP or a jmp8 to the same target.
    assert judge(Site.JUMP_LABEL, NOP2) is None
    assert judge(Site.JUMP_LABEL, rel(0xEB, SITE, own, 2), jump_target=own) is None
    assert judge(Site.JUMP_LABEL, rel(0xEB, SITE, own + 2, 2), jump_target=own) is not None


def test_static_calls_go_to_known_code_only() -> None:
    assert judge(Site.STATIC_CALL, rel(0xE8, SITE, KERNEL[0] + 0x500)) is None
    assert judge(Site.STATIC_CALL, NOP5) is None  # static_call_update(x, NULL)
    assert judge(Site.STATIC_CALL, rel(0xE8, SITE, UNOWNED)) is not None
    assert judge(Site.STATIC_CALL, rel(0xE9, SITE, KERNEL[0] + 0x500)) is not None
    assert judge(Site.STATIC_CALL_TAIL, rel(0xE9, SITE, KERNEL[0] + 0x500)) is None
    assert judge(Site.STATIC_CALL_TAIL, bytes.fromhex("c3cccccccc")) is None


def test_a_trampoline_keeps_its_signature_and_jumps_to_known_code() -> None:
    sig = bytes.fromhex("0fb9cc")
    expected = rel(0xE9, SITE, KERNEL[0] + 0x10) + sig
    assert judge(Site.TRAMPOLINE, rel(0xE9, SITE, KERNEL[0] + 0x900) + sig, expected) is None
    assert judge(Site.TRAMPOLINE, bytes.fromhex("c3cc909090") + sig, expected) is None
    assert judge(Site.TRAMPOLINE, rel(0xE9, SITE, UNOWNED) + sig, expected) is not None
    assert judge(Site.TRAMPOLINE, rel(0xE9, SITE, KERNEL[0] + 0x900) + b"\x90" * 3,
                 expected) is not None


def test_the_ftrace_callers_call_may_point_only_at_known_code() -> None:
    assert judge(Site.FTRACE_CALLER, rel(0xE8, SITE, KERNEL[0] + 0x77)) is None
    assert judge(Site.FTRACE_CALLER, rel(0xE8, SITE, UNOWNED)) is not None


def test_changed_sites_are_reported_apart_from_other_differences() -> None:
    stext = 0xFFFFFFFF81000000
    layout = build_layout(stext, stext + 3 * 4096, b"", [
        PatchSite(stext + 0x100, 5, Site.FTRACE),
        PatchSite(stext + 0x2000, 2, Site.JUMP_LABEL, stext + 0x2040),
    ])
    assert [(o, n) for o, n in layout.masks] == [(0x100, 5), (0x2000, 2)]
    assert layout.targets == [0, 0x2040]
    again = TextLayout.from_json(layout.to_json())
    assert again.kinds == layout.kinds
    assert again.targets == layout.targets
    expected = bytes(3 * 4096)
    found = bytearray(expected)
    found[0x100:0x105] = b"\xe9\x01\x02\x03\x04"  # a patch site changed
    found[0x2002] = 0x90  # one byte past the short jump label: ordinary text
    diffs, sites = compare_text(bytes(found), expected, layout)
    assert [(d.offset, d.found) for d in diffs] == [(0x2002, b"\x90")]
    assert [(s.offset, s.kind, s.found) for s in sites] == [
        (0x100, Site.FTRACE, b"\xe9\x01\x02\x03\x04")]


def test_a_profile_without_site_kinds_is_refused() -> None:
    data = build_layout(0, 4096, b"", [PatchSite(16, 5, Site.FTRACE)]).to_json()
    del data["mask_kinds"]
    with pytest.raises(ValueError, match="rebuild the profile"):
        TextLayout.from_json(data)
