"""Progress display for long steps, on stderr so stdout stays machine-readable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

stderr = Console(stderr=True, highlight=False, markup=False)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Show a spinner for ``what`` on a terminal, a start/end line otherwise."""
    start = time.monotonic()
    if stderr.is_terminal:
        with stderr.status(what + " ..."):
            yield
    else:
        stderr.print(f"[vims] {what} ...")
        yield
    stderr.print(f"[vims] {what}: done in {time.monotonic() - start:.1f} s")


def note(message: str) -> None:
    """A one-line notice for the operator (not an error)."""
    stderr.print(f"[vims] {message}")
