"""The lab C-VM: a real Debian kernel with a busybox workload under QEMU.

Its RAM lives in a shared file, so the A-VM side of VIMS can introspect it
live, as it would a Xen domain.
"""

from vims.lab.manager import Lab, LabManager, LabSpec

__all__ = ["Lab", "LabManager", "LabSpec"]
