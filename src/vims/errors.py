"""Typed errors of the VIMS runtime.

Every error carries a one-line message meant for the operator; the CLI prints it
on stderr and exits with status 2 (bad input or environment), as the CLI contract
says.
"""

from __future__ import annotations


class VimsError(Exception):
    """Base class: something the operator must fix (bad input, missing tool, ...)."""

    exit_code = 2

    def __str__(self) -> str:
        # Keep messages to one line whatever the cause carried.
        return " ".join(super().__str__().split())


class LabError(VimsError):
    """The lab C-VM could not be created, reached or cleaned up."""


class GuestCommandError(LabError):
    """A command sent to the guest console did not complete."""
