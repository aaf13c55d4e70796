"""A TCP proxy on loopback in front of a real S3 server that breaks things the way networks and gateways do.

Two ways to break them:

- `break_after_bytes=N`: after N bytes from clients, drop every connection and refuse new ones (a path that dies).
- `fault=...`: for HTTP requests whose request line contains `match`, the first `times` of them (`times=None`: all
  of them, for good), instead of forwarding the request:
    "drop"   read half of the request body, then reset the connection (a gateway that crashes mid-upload);
    "500"    answer `500 InternalError` with S3's XML error body, then close;
    "503"    answer `503 SlowDown` (S3's throttling reply), then close;
    "stall"  read the whole request, answer nothing for `stall_s` seconds, then close (a hung server);
    "cut"    forward the request, pass on the first `cut_bytes` of the response, then close the connection (a
             download cut off mid-body); with `down_after_cut`, the proxy then refuses everything (an outage).

`requests` records every request line with its Range header, so a test can count GETs per object.

It parses just enough HTTP/1.1 (request head, Content-Length body) to find request boundaries on kept-alive
connections; responses stream back untouched. Everything runs in daemon threads on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

REQUEST_FAULTS = ("drop", "500", "503", "stall")  # what happens to a request (an upload's, say)
FAULTS = (*REQUEST_FAULTS, "cut")
_ERRORS = {
    "500": ("500 Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        break_after_bytes: int | None = None,
        *,
        fault: str | None = None,
        times: int | None = None,
        match: str = "",
        stall_s: float = 30.0,
        cut_bytes: int = 0,
        down_after_cut: bool = False,
    ):
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, not {fault!r}")
        self.upstream = ("127.0.0.1", upstream_port)
        self.break_after = break_after_bytes
        self.fault, self.times, self.match, self.stall_s = fault, times, match, stall_s
        self.cut_bytes, self.down_after_cut = cut_bytes, down_after_cut
        self.requests: list[tuple[str, str | None]] = []  # (request line, Range header) of every request
        self.sent = 0  # bytes received from clients
        self.injected: list[str] = []  # request lines of the requests a fault was injected into
        self.broken = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.broken.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, upstream]
            cut: list[int | None] = [None]  # bytes of the current response still to pass on, when it is to be cut
            threading.Thread(target=self._requests, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, cut), daemon=True).start()

    def _responses(self, upstream: socket.socket, client: socket.socket, cut: list) -> None:
        try:
            while data := upstream.recv(65536):
                if cut[0] is not None:
                    data, cut[0] = data[: cut[0]], cut[0] - len(data[: cut[0]])
                    client.sendall(data)
                    if cut[0] == 0:  # closed (FIN, not a reset: a reset may drop what the client has not read)
                        if self.down_after_cut:
                            self.break_all()
                        return
                    continue
                client.sendall(data)
        except OSError:
            pass
        finally:
            _shut(upstream, client)

    def _requests(self, client: socket.socket, upstream: socket.socket, cut: list) -> None:
        """Client to server, one request at a time (clients wait for each response before the next request)."""
        reader = client.makefile("rb")
        try:
            while head := self._read_head(reader):
                with self._lock:
                    self.requests.append((head.split(b"\r\n", 1)[0].decode("latin-1"), _header(head, "range")))
                length, expects_continue = _body_of(head)
                if length is None:  # a chunked body: no boundaries to find, so pass the rest through untouched
                    upstream.sendall(head)
                    while data := self._read(reader, 65536):
                        upstream.sendall(data)
                    return
                fault = self._take_fault(head)
                if fault == "cut":
                    cut[0] = self.cut_bytes
                    fault = None
                if fault is None:
                    upstream.sendall(head)  # the server's own `100 Continue`, if asked for, flows back via _responses
                    self._copy_body(reader, length, upstream)
                    continue
                if expects_continue and fault in ("drop", "stall"):
                    client.sendall(_CONTINUE)  # so that the client sends the body we mean to (partly) read
                if fault == "drop":
                    self._copy_body(reader, length // 2, None)
                    # linger 0: close sends RST, so the client sees a reset rather than a tidy end of stream
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    reader.close()
                    client.close()
                    return
                if fault == "stall":
                    self._copy_body(reader, length, None)
                    self._closed.wait(self.stall_s)
                    return
                status, code, message = _ERRORS[fault]
                body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                        f"</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                client.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}"
                               f"\r\nConnection: close\r\n\r\n".encode() + body)
                # Half-close and read what the client still sends until it hangs up: closing with unread input
                # would reset the connection and could destroy the error response before the client reads it.
                client.shutdown(socket.SHUT_WR)
                client.settimeout(5)
                while self._read(reader, 65536):
                    pass
                return
        except OSError:
            pass
        finally:
            reader.close()  # before the socket: the file object keeps its descriptor open
            _shut(client, upstream)

    def _take_fault(self, head: bytes) -> str | None:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        with self._lock:
            if self.fault is None or self.match not in line:
                return None
            if self.times is not None and len(self.injected) >= self.times:
                return None
            self.injected.append(line)
            return self.fault

    def _read(self, reader, n: int) -> bytes:
        """Up to `n` bytes from a client, counted against `break_after_bytes`."""
        data = reader.read1(n)
        self._count(len(data))
        return data

    def _count(self, n: int) -> None:
        with self._lock:
            self.sent += n
            over = self.break_after is not None and self.sent > self.break_after
        if over:
            self.break_all()
            raise ConnectionAbortedError("fault proxy: byte budget spent, connections dropped")

    def _read_head(self, reader) -> bytes:
        """The request line and headers (b"" when the client closed between requests)."""
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline(65537)
            self._count(len(line))
            if not line:
                return b""
            head += line
        return head

    def _copy_body(self, reader, length: int, dst: socket.socket | None) -> None:
        while length > 0:
            data = self._read(reader, min(length, 65536))
            if not data:
                raise ConnectionAbortedError("client closed mid-body")
            length -= len(data)
            if dst is not None:
                dst.sendall(data)

    def break_all(self) -> None:
        self.broken.set()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed.set()
        self.break_all()
        self._listener.close()


def _header(head: bytes, wanted: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == wanted:
            return value.strip()
    return None


def _body_of(head: bytes) -> tuple[int | None, bool]:
    """(Content-Length, whether the client waits for `100 Continue`); length None for a chunked body."""
    length, expects_continue = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            return None, False
        elif name == "expect":
            expects_continue = value == "100-continue"
    return length, expects_continue


def _shut(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
