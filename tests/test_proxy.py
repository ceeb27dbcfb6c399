"""The fault-injection proxy (`simulators.proxy.FaultProxy`) does what the fault tests rely on: it forwards
both ways; `cut()` resets open connections and refuses new ones on the same port, as a restarting server
does; `blackhole()` accepts and answers nothing; `restore()` brings forwarding back on the same port."""
from __future__ import annotations

import socket
import socketserver
import threading
from contextlib import contextmanager

import pytest

from simulators.proxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(4096):
            self.request.sendall(data)


@contextmanager
def echo_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def proxy():
    with echo_server() as port, FaultProxy("127.0.0.1", port) as proxy:
        yield proxy


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_both_ways_on_several_connections(proxy):
    with connect(proxy) as a, connect(proxy) as b:
        assert echo(a, b"hello") == b"hello"
        assert echo(b, b"x" * 200_000) == b"x" * 200_000
    assert proxy.accepted == 2


def test_cut_resets_open_connections_and_refuses_new_ones_until_restored(proxy):
    port = proxy.port
    sock = connect(proxy)
    assert echo(sock, b"before") == b"before"
    proxy.cut()
    with pytest.raises(OSError):
        sock.sendall(b"after")
        if not sock.recv(10):  # a reset shows as an error or as the end of the stream
            raise ConnectionResetError
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    proxy.restore()
    assert proxy.port == port
    with connect(proxy) as again:
        assert echo(again, b"back") == b"back"


def test_blackhole_accepts_answers_nothing_and_delivers_what_it_held_once_restored(proxy):
    held = connect(proxy)
    assert echo(held, b"one") == b"one"
    proxy.blackhole()
    held.sendall(b"two")
    held.settimeout(0.5)
    with pytest.raises(socket.timeout):
        held.recv(10)
    new = connect(proxy)  # the handshake succeeds: the host seems up
    new.sendall(b"three")
    new.settimeout(0.5)
    with pytest.raises(socket.timeout):
        new.recv(10)
    proxy.restore()
    held.settimeout(2)
    new.settimeout(2)
    assert held.recv(10) == b"two"
    assert new.recv(10) == b"three"
    held.close()
    new.close()


def test_url_for_points_a_url_at_the_proxy(proxy):
    assert proxy.url_for("mysql+mysqldb://root@127.0.0.1:3306/db?charset=utf8mb4") == \
        f"mysql+mysqldb://root@127.0.0.1:{proxy.port}/db?charset=utf8mb4"
    assert proxy.url_for("redis://127.0.0.1:6379/11") == f"redis://127.0.0.1:{proxy.port}/11"
