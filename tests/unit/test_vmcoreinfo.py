"""VMCOREINFO parsing on crafted, hostile and truncated notes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vims.vmi.vmcoreinfo import parse_note, scan

NOTE = (b"OSRELEASE=6.1.0-56-amd64\nBUILD-ID=eb4fbcd0\nPAGESIZE=4096\n"
        b"SYMBOL(_stext)=ffffffffbae00000\nKERNELOFFSET=39e00000\n")


def test_scan_finds_a_note_among_noise() -> None:
    mem = b"\xff" * 4096 + NOTE + b"\0" + b"OSRELEASE=%s\n\0" + b"\0" * 100
    notes = scan(mem)
    assert len(notes) == 1  # the printf template in .rodata is not a note
    note = notes[0]
    assert note.phys_addr == 4096
    assert (note.release, note.build_id, note.kaslr_offset) == ("6.1.0-56-amd64", "eb4fbcd0",
                                                                 0x39E00000)
    assert note.symbol("_stext") == 0xFFFFFFFFBAE00000
    assert note.symbol("nope") is None


def test_malformed_notes_are_refused() -> None:
    assert parse_note(b"OSRELEASE=x\nnot a key line\n") is None
    assert parse_note(b"OSRELEASE=x\nKEY=" + b"A" * 300 + b"\n") is None
    assert parse_note(b"OSRELEASE=\xff\xfe\n") is None
    assert parse_note(b"PAGESIZE=4096\n") is None


def test_unterminated_note_is_bounded() -> None:
    assert scan(b"OSRELEASE=1\n" + b"A=1\n" * 10000) == []  # no NUL within the bound


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    for note in scan(b"OSRELEASE=" + data + b"\0" + data):
        assert note.release
