"""Offline stand-in for the get-pip.py that ``ansible-test`` downloads (no internet here).

ansible-test runs it as ``python get_pip.py [pip options] pip==X [--no-setuptools]
[--no-wheel]`` inside a fresh venv; ensurepip gives a pip, which then installs the
requested version from the configured (mirrored) index.
"""

import subprocess
import sys

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"],
                      stdout=subprocess.DEVNULL)
subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", *args])
