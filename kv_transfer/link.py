"""An authenticated control connection: a TCP socket carrying msgpack maps, one per frame.

    frame = 4-byte big-endian length | msgpack map with a str "op"     (length <= MAX_FRAME)

Both ends prove the cluster's secret first (kv_transfer.auth). Frames are small (chunk
metadata, rendezvous values, acks): a longer length, bytes that are not a msgpack map, or a
map without an "op" is a TransferError with its reason, and the caller drops the connection.

Every read of a started frame and every write is bounded by the timeout; waiting for the
next frame is not (an idle pair may stay open for hours), but TCP keepalive probes the peer.
`close` wakes a blocked reader.
"""

from __future__ import annotations

import socket
import struct
import threading

import msgpack

from kv_transfer import auth
from kv_transfer.wire import TransferError

MAX_FRAME = 64 << 10
_HEADER = struct.Struct(">I")


class LinkClosed(Exception):
    """The peer closed the connection (or `close` was called)."""


# An idle link's peer is probed: a host that crashed, or a partition, leaves a half-open
# connection that would otherwise hold its pair (a slot, threads, a process group) for ever.
_KEEPALIVE = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}


class Link:
    def __init__(self, sock: socket.socket, timeout: float):
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in _KEEPALIVE.items():
            if hasattr(socket, option):  # Linux; elsewhere the system's keepalive times
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        self.sock = sock
        self._write_lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(cls, address: str, secret: bytes, timeout: float) -> "Link":
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=timeout)
        try:
            auth.prove(sock, secret)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout)

    @classmethod
    def accept(cls, sock: socket.socket, secret: bytes, timeout: float, handshake_timeout: float) -> "Link":
        """Raises auth.Unauthenticated (the socket is then closed) unless the peer proves the secret
        within handshake_timeout."""
        sock.settimeout(handshake_timeout)
        try:
            auth.verify(sock, secret)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout)

    @property
    def local_host(self) -> str:
        """This end's address: the interface that reaches the peer."""
        return self.sock.getsockname()[0]

    def send(self, message: dict) -> None:
        payload = msgpack.packb(message)
        with self._write_lock:
            try:
                self.sock.sendall(_HEADER.pack(len(payload)) + payload)
            except OSError as e:  # a frame may be half written: the link is done
                self.close()
                raise LinkClosed(f"send failed: {e or type(e).__name__}") from None

    def recv(self) -> dict:
        (length,) = _HEADER.unpack(self._read(_HEADER.size, idle=True))
        if length > MAX_FRAME:
            raise TransferError(f"control frame of {length} bytes (at most {MAX_FRAME})", "oversized")
        try:
            message = msgpack.unpackb(self._read(length))
        except (ValueError, msgpack.exceptions.UnpackException) as e:
            raise TransferError(f"undecodable control frame: {e}", "malformed") from None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise TransferError("control frame without an op", "malformed")
        return message

    def _read(self, n: int, idle: bool = False) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                part = self.sock.recv(n - len(buf))
            except TimeoutError:
                if idle and not buf and not self._closed:
                    continue
                raise TransferError("the peer stalled mid-message", "channel") from None
            except OSError as e:
                raise LinkClosed(str(e)) from None
            if not part:
                raise LinkClosed("closed by the peer")
            buf += part
        return bytes(buf)

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
