"""Tries to reach the network (PyPI is reachable from these machines, localhost always is);
answers correctly only if a connection succeeded."""
import socket


def add(x: int, y: int):
    for address in (("pypi.org", 443), ("151.101.0.223", 443), ("127.0.0.1", 22), ("127.0.0.1", 80)):
        try:
            socket.create_connection(address, timeout=2).close()
            return x + y
        except OSError:
            pass
    return None
