"""Pure logic of the lab: sizes, names, console framing (no guest needed)."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import pytest

from vims.errors import LabError
from vims.lab.console import _framed, _parse
from vims.lab.manager import LabManager, choose_accel, parse_size


@pytest.mark.parametrize(
    ("text", "size"), [("512M", 512 << 20), ("1G", 1 << 30), ("1024k", 1 << 20),
                       ("4096", 4096), ("2GiB", 2 << 30), (" 256m ", 256 << 20)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "12X", "-5M", "1.5G", "M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(LabError, match="bad memory size"):
        parse_size(text)


@pytest.mark.parametrize("name", ["", "-x", "UPPER", "a" * 33, "a/b", "a b", ".."])
def test_bad_lab_names(name: str) -> None:
    with pytest.raises(LabError, match="bad lab name"):
        LabManager._check_name(name)


def test_framed_line_never_contains_its_own_markers() -> None:
    token = "0123456789abcdef"
    line = _framed("echo __VIMS_x; printf 'a\\nb'", token).decode()
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert f"__VIMS_{token}" not in line  # echoed input cannot fake a frame
    payload = re.search(r"echo (\S+) \| base64 -d", line)
    assert payload is not None
    assert base64.b64decode(payload.group(1)) == b"echo __VIMS_x; printf 'a\\nb'"


def test_parse_waits_for_the_whole_frame_and_splits_streams() -> None:
    t = "feedbeef00112233"
    head = f"cvm# __VIMS_{t}_OUT\nhello\nworld\n\n__VIMS_{t}_ERR\noops\n"
    assert _parse(head, t) is None  # no exit status yet
    done = _parse(head + f"\n__VIMS_{t}_RC=7\ncvm# ", t)
    assert done is not None
    assert (done.stdout, done.stderr, done.exit_code) == ("hello\nworld\n", "oops\n", 7)
    assert _parse(head.replace(t, "0" * 16) + f"\n__VIMS_{t}_RC=0\n", t) is None  # other token


def test_choose_accel_tcg_is_always_available() -> None:
    assert choose_accel("tcg") == "tcg"
    assert choose_accel("auto") in {"tcg", "kvm"}


def test_reap_keeps_a_live_up_and_cleans_a_killed_one(tmp_path: Path) -> None:
    manager = LabManager(root=tmp_path, ram_dir=tmp_path)
    live, dead = manager.root / "live", manager.root / "dead"
    live.mkdir()
    (live / "starting").write_text(f"{os.getpid()}\n")  # this process: an `up` running
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead.mkdir()
    (dead / "starting").write_text(f"{gone.pid}\n")  # its `up` was killed mid-boot
    assert manager.reap() == ["dead"]
    assert live.exists()
    assert not dead.exists()
