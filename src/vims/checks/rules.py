"""Policy rules over processes: the one matcher process.* and behaviour.* share."""

from __future__ import annotations

import fnmatch
from typing import Any

from vims.vmi.linux import Task

__all__ = ["glob_any", "matches"]


def glob_any(value: str, patterns: str | list[str]) -> bool:
    """*value* matches the glob, or one of the list of globs."""
    pats = patterns if isinstance(patterns, list) else [patterns]
    return any(fnmatch.fnmatchcase(value, str(p)) for p in pats)


def _ints(value: Any) -> set[int]:
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def matches(rule: dict[str, Any], t: Task, parent: Task | None) -> bool:
    """A rule matches when each key it names matches (``comm``, ``exe``, ``parent``:
    globs; ``uid``: the effective uid; a list means any of them)."""
    if "comm" in rule and not glob_any(t.comm, rule["comm"]):
        return False
    if "exe" in rule and not glob_any(t.exe, rule["exe"]):
        return False
    if "uid" in rule and t.euid not in _ints(rule["uid"]):
        return False
    return "parent" not in rule or (parent is not None and glob_any(parent.comm, rule["parent"]))
