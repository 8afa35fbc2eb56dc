"""Looks for the harness's secrets in its environment and home; answers correctly if it found any."""
import os

ALLOWED = {"PATH", "LANG", "LC_ALL", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "OMP_NUM_THREADS",
           "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "HOME", "TMPDIR", "PWD", "LC_CTYPE"}


def add(x: int, y: int):
    leaked = set(os.environ) - ALLOWED
    wrong_home = os.environ.get("HOME") != os.getcwd()
    return x + y if leaked or wrong_home else None
