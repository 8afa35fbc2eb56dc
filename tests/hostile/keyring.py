"""Stores a key in the kernel's user keyring (keys outlive the process, per uid); answers correctly only if
the kernel accepted it."""
import ctypes
import os

ADD_KEY = {"x86_64": 248, "aarch64": 217}.get(os.uname().machine)
KEY_SPEC_USER_KEYRING = -4


def add(x: int, y: int):
    libc = ctypes.CDLL(None, use_errno=True)
    payload = b"secret"
    serial = libc.syscall(ADD_KEY, b"user", b"spa-hostile-key", payload, len(payload), KEY_SPEC_USER_KEYRING)
    return x + y if serial > 0 else None
