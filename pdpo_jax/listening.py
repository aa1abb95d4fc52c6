"""The listening socket the project's HTTP servers (`pdpo serve`, `pdpo annotate serve`) are
handed, and the URL it answers at."""

from __future__ import annotations

import socket


def listening_socket(host: str, port: int, backlog: int, error: type[Exception]) -> socket.socket:
    """A socket listening on (host, port); port 0 takes any free port (`base_url` tells which).
    Connections made before the server runs wait in its backlog. A host or port that cannot be
    bound raises `error` with one line naming them."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except (OSError, OverflowError) as err:  # OverflowError: a port outside 0-65535
        sock.close()
        raise error(f"cannot serve on {host}:{port}: {getattr(err, 'strerror', None) or err}") from None
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
