"""Connects to unix sockets on the host's file system (a network namespace does not cover path sockets):
the test's listener at @SOCKET_PATH@ and any socket under /run, /var/run and /tmp. Answers correctly only
if a connection succeeded."""
import glob
import socket

PATHS = ["@SOCKET_PATH@"] + glob.glob("/run/**", recursive=True) + glob.glob("/var/run/**", recursive=True) + glob.glob("/tmp/**", recursive=True)


def add(x: int, y: int):
    for path in PATHS:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(path)
                return x + y
        except OSError:
            pass
    return None
