"""Syntax check of an xl domain configuration without a running hypervisor.

`xl -N create` needs a running Xen, so the parser xl itself uses (libxlutil's
xlu_cfg_readfile) is called through ctypes. Exit 0 when the file parses, 1 with
libxlutil's message otherwise, 2 when libxlutil is missing.
"""

import ctypes
import ctypes.util
import glob
import sys


def libxlutil():
    name = ctypes.util.find_library("xlutil")
    candidates = ([name] if name else []) + sorted(glob.glob("/usr/lib/*/libxlutil.so*")) + sorted(
        glob.glob("/usr/lib/xen-*/lib/libxlutil.so*"))
    for cand in candidates:
        try:
            return ctypes.CDLL(cand)
        except OSError:
            continue
    return None


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: xl-syntax-check.py CONFIG\n")
        return 2
    lib = libxlutil()
    if lib is None:
        sys.stderr.write("libxlutil not found (Debian package libxenmisc4.17)\n")
        return 2
    libc = ctypes.CDLL(None)
    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.xlu_cfg_init.restype = ctypes.c_void_p
    lib.xlu_cfg_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.xlu_cfg_readfile.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.xlu_cfg_destroy.argtypes = [ctypes.c_void_p]
    report = libc.fdopen(2, b"w")  # libxlutil reports parse errors on this stream
    cfg = lib.xlu_cfg_init(report, argv[1].encode())
    if not cfg:
        sys.stderr.write("xlu_cfg_init failed\n")
        return 2
    rc = lib.xlu_cfg_readfile(cfg, argv[1].encode())
    lib.xlu_cfg_destroy(cfg)
    libc.fflush(None)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
