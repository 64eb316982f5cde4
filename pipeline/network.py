"""One quick reachability check, so an offline machine fails in seconds instead of hanging on downloads."""
from __future__ import annotations

import socket
import threading
import time

REMEMBER_S = 60.0  # one answer per host serves a whole scheduling pass (many tasks ask the same)
_ANSWERS: dict[str, tuple[float, tuple[bool, str]]] = {}


def reachable(host: str, timeout: float = 3.0) -> tuple[bool, str]:
    """(True, "") when a TCP connection to host:443 opens within ``timeout``; else (False, why).

    The answer is remembered for REMEMBER_S seconds, so an offline command waits for each host once."""
    seen = _ANSWERS.get(host)
    if seen and time.monotonic() - seen[0] < REMEMBER_S:
        return seen[1]
    answer = _probe(host, timeout)
    _ANSWERS[host] = (time.monotonic(), answer)
    return answer


def _probe(host: str, timeout: float) -> tuple[bool, str]:
    error: list[BaseException] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError as e:
            error.append(e)

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout + 1.0)
    if t.is_alive():
        return False, "no answer"
    return (False, str(error[0])) if error else (True, "")
