"""Loopback ports that web browsers refuse to connect to: where dev services that must not meet web pages listen.

Any page open in the developer's browser can send requests to 127.0.0.1. The
Firestore emulator answers them all: it reflects any ``Origin`` with
credentials and honours the admin token ``Authorization: Bearer owner``, which
bypasses the security rules, so a page could read and delete every document.
Its options cannot change that. Browsers, though, refuse outright to fetch
from the Fetch standard's "bad ports", kept for protocols that HTTP must not
reach (Chromium, Firefox and WebKit all apply the list): a service there is
out of every page's reach, while gRPC clients (the workers) connect as to any
port.

Example::

    main, websocket, webchannel = browser_refused_ports(3)
"""

from __future__ import annotations

import socket

from haulage.errors import ConfigError

#: the Fetch standard's unprivileged bad ports; IRC's first (rarely used on a dev machine)
BROWSER_REFUSED = (6665, 6666, 6667, 6668, 6669, 6697, 6000, 6566, 10080, 5060, 5061, 2049, 4045, 1719, 1720, 1723,
                   3659)  # fmt: skip


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def browser_refused_ports(count: int) -> list[int]:
    """``count`` free loopback ports that browsers refuse; ConfigError when fewer are free."""
    free = [port for port in BROWSER_REFUSED if _free(port)][:count]
    if len(free) < count:
        raise ConfigError(f"needs {count} free port(s) among {', '.join(map(str, BROWSER_REFUSED))} (ports web "
                          f"browsers refuse), found {len(free)}; stop another `haulage dev --store firestore` or "
                          "set HAULAGE_DEV_FIRESTORE_PORT (then web pages can reach the emulator)")  # fmt: skip
    return free
