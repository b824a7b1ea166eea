"""Errors of the introspection layer (profiles, kernel images, BTF, kallsyms)."""

from __future__ import annotations

from vims.errors import VimsError


class ProfileError(VimsError):
    """A kernel image or profile is unusable: missing, malformed, truncated or mismatched.

    Kernel images and BTF are parsed from files an operator supplies and, for
    memory, from bytes a C-VM controls; every malformation ends here with a
    one-line message instead of an IndexError or struct.error deep inside.
    """
