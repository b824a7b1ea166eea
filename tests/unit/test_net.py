"""free_port: consecutive free ports, picked below the ephemeral range."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from vims import net


def test_ports_are_free_consecutive_and_below_the_ephemeral_range() -> None:
    floor = net._ephemeral_floor()
    for count in (1, 2, 3):
        port = net.free_port(count)
        assert port >= net.LOWEST
        assert port + count <= floor
        for p in range(port, port + count):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))  # raises if it was not free


def test_a_taken_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        free = net.free_port(2)
        picks: Iterator[int] = iter([taken - 1, taken, free])  # pairs over it, then a free one
        monkeypatch.setattr(net.random, "randrange", lambda lo, hi: next(picks))
        assert net.free_port(2) == free


def test_count_is_bounded() -> None:
    for bad in (0, 17, -1):
        with pytest.raises(ValueError, match="count must be 1-16"):
            net.free_port(bad)
