"""The gateway's HTTP server: uvicorn, with what it lacks in front of untrusted clients.

uvicorn has no header timeout: a client that sends a header line every few seconds holds its socket (and, with
enough of them, the process's file descriptors) for good. Here every connection must send a whole request — its
line, headers and body — within `request_timeout_s` of connecting or of its previous response, or it is closed;
an idle keep-alive connection goes after `keep_alive_s` (uvicorn's own timer); past `max_connections` open
sockets a new one is closed at once, and requests past that many are answered 503 (uvicorn's
`limit_concurrency`). A long response (a followed log) is not cut: the clock stops once its request is in.
An ingress in front should do the same per client (infra/README.md).
"""

from __future__ import annotations

import asyncio
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("peftfleet.gateway")


def guarded_protocol(request_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with a deadline on reading each request and a cap on open sockets."""

    class Guarded(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(request_timeout_s, self._too_slow)

        def _too_slow(self) -> None:
            # IDLE: the request line and headers are not all here; SEND_BODY: the body is not
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return Guarded


def run(app, host: str, port: int, request_timeout_s: float, keep_alive_s: float, max_connections: int) -> None:
    uvicorn.run(app, host=host, port=port, log_level="info", http=guarded_protocol(request_timeout_s, max_connections),
                timeout_keep_alive=keep_alive_s, limit_concurrency=max_connections)
