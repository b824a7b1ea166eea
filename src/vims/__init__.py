"""VIMS: semantic integrity attestation of virtual machines through introspection."""

__version__ = "0.1.0"
