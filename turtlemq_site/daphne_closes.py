"""Let daphne close WebSockets with the codes PROTOCOL.md names (1003, 1009).

Daphne passes an application's ``websocket.close`` code to autobahn's
``sendClose``, which only accepts 1000 and 3000-4999 (the codes a browser
script may use; django/daphne#374): a consumer's ``close(code=1003)`` raised
there and the peer saw 1011. And when a frame exceeds
``--websocket-max-message-size``, autobahn by default drops the TCP connection
without a close frame, so the peer saw 1006 instead of 1009.
"""

from __future__ import annotations

from daphne.ws_protocol import WebSocketProtocol

# Codes RFC 6455 (section 7.4.1) lets an endpoint send that autobahn's sendClose refuses.
PROTOCOL_CLOSE_CODES = frozenset({1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011})


def install() -> None:
    """Patch daphne's WebSocket protocol once; harmless when another server runs the app."""
    if getattr(WebSocketProtocol, "_turtlemq_closes", False):
        return
    original_server_close = WebSocketProtocol.serverClose

    def server_close(self: WebSocketProtocol, code: int | None = None) -> None:
        if code in PROTOCOL_CLOSE_CODES:
            # The lower-level call sends any code and runs the same closing handshake.
            self.sendCloseFrame(code=code, isReply=False)
        else:
            original_server_close(self, code)

    WebSocketProtocol.serverClose = server_close
    # Autobahn copies protocol options from the factory only where the protocol
    # class does not set them: fail with a close frame (1009 for an oversize
    # frame) rather than by dropping the connection.
    WebSocketProtocol.failByDrop = False
    WebSocketProtocol._turtlemq_closes = True
