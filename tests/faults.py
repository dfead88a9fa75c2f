"""Fault injection for tests: a TCP proxy that can cut the line to a server (RabbitMQ, PostgreSQL, MLflow, ...).

    proxy = TcpProxy("127.0.0.1", 5672)                 # listens on 127.0.0.1:<proxy.port> at once
    settings = settings.replace(amqp_url=proxy.url_for(settings.amqp_url))
    ...                                                 # clients connect through the proxy
    proxy.cut()                                         # server unreachable: connections dropped, new ones reset
    proxy.delay_s = 0.5                                 # a slow server: every answer chunk waits 0.5 s
    proxy.restore()                                     # reachable again; clients must reconnect by themselves
    proxy.close()                                       # or use it as a context manager

It runs in background threads, so it works the same from sync and async tests. While cut, the listening socket
stays open (the port never changes) but every new connection is reset at once, which a client sees the way it
sees a server that is down: a failed connect. Existing connections are closed, so clients see the loss at once,
like a broker restart (not a silent network partition).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self._server = socket.create_server((listen_host, 0))
        self._server.settimeout(0.2)
        self.host, self.port = self._server.getsockname()[:2]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self.connections = 0  # connections forwarded so far
        self.delay_s = 0.0  # added before forwarding each chunk the server sends
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"tcpproxy-{self.port}", daemon=True)
        self._acceptor.start()

    def url_for(self, url: str) -> str:
        """`url` with its host:port replaced by the proxy's (credentials, path and query kept)."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@{self.host}:{self.port}" if credentials else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def cut(self) -> None:
        """Make the server unreachable: close every proxied connection and reset new ones until restore()."""
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _hard_close(sock)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    @property
    def is_cut(self) -> bool:
        return self._cut

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._acceptor.join()
        self._server.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut:
                _hard_close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _hard_close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._cut:  # cut while we were connecting
                    _hard_close(client)
                    _hard_close(upstream)
                    continue
                self._sockets.update((client, upstream))
                self.connections += 1
            for source, sink, slow in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, slow), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while data := source.recv(65536):
                if slow and self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._sockets.difference_update((source, sink))
        for sock in (source, sink):
            _hard_close(sock)


def _hard_close(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), so the peer notices at once instead of lingering in FIN states."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
