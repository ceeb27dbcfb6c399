"""A TCP forwarder on 127.0.0.1 that injects network faults, for tests and the fault bench (`bench/faults.py`).

`FaultProxy(target_host, target_port)` listens on a port of its own and forwards every connection to the
target. Point a process's `SMS_DATABASE_URL` or `CELERY_BROKER_URL` at `proxy.port` instead of the real
server, then:

- `cut()` resets every open connection and refuses new ones (the port is closed): what clients see while
  MariaDB or Redis restarts;
- `blackhole()` keeps accepting connections but forwards nothing either way, without closing anything: a
  host that swallows packets, or a provider that accepts connections and never answers;
- `restore()` forwards again (after a blackhole, what was held is delivered, as TCP would after a healed
  partition; after a cut, clients must reconnect).

Loopback only; every thread is a daemon and `stop()` closes everything.
"""
from __future__ import annotations

import select
import socket
import struct
import threading

POLL_S = 0.05
"""How often a blocked forwarding thread looks at the proxy's state."""


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: socket.socket):
        self.client = client
        self.upstream: socket.socket | None = None
        self.dead = threading.Event()

    def close(self) -> None:
        """Reset both ends (SO_LINGER 0: an RST, as from a restarted server, not a polite FIN)."""
        self.dead.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            sock.close()


class FaultProxy:
    """Forwards 127.0.0.1:`port` (0 picks a free one, kept across `cut()`/`restore()`) to
    `target_host:target_port`. Counts the connections it accepted (`accepted`)."""

    def __init__(self, target_host: str, target_port: int, port: int = 0):
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.accepted = 0
        self.port = port
        self._listen()

    # --- faults ----------------------------------------------------------------------------------

    def cut(self) -> None:
        """Refuse new connections and reset every open one; returns once they are all closed."""
        self._close_listener()
        with self._lock:
            links, self._links = self._links, set()
        for link in links:
            link.close()

    def blackhole(self) -> None:
        """Accept connections, forward nothing (in either direction) until `restore()`."""
        self._flowing.clear()

    def restore(self) -> None:
        """Forward again: listen again after a cut, release what a blackhole held."""
        self._flowing.set()
        if self._listener is None and not self._stopped.is_set():
            self._listen()

    def stop(self) -> None:
        self._stopped.set()
        self._flowing.set()
        self.cut()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def url_for(self, url: str) -> str:
        """`url` (`scheme://user@host:port/…`) with its host and port replaced by this proxy's."""
        scheme, rest = url.split("://", 1)
        authority, sep, path = rest.partition("/")
        user, at, _ = authority.rpartition("@")
        return f"{scheme}://{user}{at}127.0.0.1:{self.port}{sep}{path}"

    # --- forwarding ------------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(POLL_S)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), name=f"proxy:{self.port}",
                                          daemon=True)
        self._acceptor.start()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            if self._acceptor is not None and self._acceptor is not threading.current_thread():
                self._acceptor.join(timeout=5)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:  # closed by cut() or stop()
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client)
            with self._lock:
                self._links.add(link)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(link,), daemon=True).start()

    def _wait_flowing(self, link: _Link) -> bool:
        """Wait while blackholed; False once the link is dead."""
        while not self._flowing.wait(POLL_S):
            if link.dead.is_set():
                return False
        return not link.dead.is_set()

    def _serve(self, link: _Link) -> None:
        if not self._wait_flowing(link):
            return
        try:
            link.upstream = socket.create_connection(self.target, timeout=5)
            link.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self._drop(link)
            return
        if link.dead.is_set():  # cut while connecting
            link.close()
            return
        back = threading.Thread(target=self._pump, args=(link, link.upstream, link.client), daemon=True)
        back.start()
        self._pump(link, link.client, link.upstream)
        back.join()

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket) -> None:
        try:
            while self._wait_flowing(link):
                readable, _, _ = select.select([source], [], [], POLL_S)
                if not readable or not self._flowing.is_set():
                    continue
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except (OSError, ValueError):  # reset, or closed under us by cut()
            pass
        self._drop(link)

    def _drop(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)
        if not link.dead.is_set():
            link.close()
