"""The cluster secret, and how a KV connection proves it before anything is accepted.

cluster/ makes a random secret at start-up and hands it to every worker through Ray (inside
the trust boundary). It never travels on a KV socket:

  nccl backend, our control socket: mutual challenge/response (HMAC-SHA256)
    receiver -> sender   MAGIC + nonce_r
    sender -> receiver   nonce_s + HMAC(secret, "sender" | nonce_r | nonce_s)
    receiver -> sender   HMAC(secret, "receiver" | nonce_s | nonce_r)
  The receiver checks the sender's proof before reading anything else; the sender checks the
  receiver's before sending any KV (an impostor listening on the address learns nothing).

  grpc backend: the stream's metadata carries HMAC(secret, "grpc"), compared in constant time
  when the stream opens, before its first message is read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket

MAGIC = b"PDKV1"
_NONCE = 32
_MAC = hashlib.sha256().digest_size
GRPC_TOKEN_KEY = "x-pdserve-kv-token"


class Unauthenticated(Exception):
    """The peer did not prove the cluster's secret."""


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("the KV transfer secret must be at least 16 random bytes (cluster/ makes one per cluster)")
    return secret


def _mac(secret: bytes, role: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join((role, *parts)), hashlib.sha256).digest()


def prove(sock: socket.socket, secret: bytes) -> None:
    """Sender side of the handshake (the socket's timeout bounds every read)."""
    hello = _read_exactly(sock, len(MAGIC) + _NONCE)
    if not hello.startswith(MAGIC):
        raise Unauthenticated("the peer is not a pdserve KV receiver")
    nonce_r, nonce_s = hello[len(MAGIC) :], secrets.token_bytes(_NONCE)
    sock.sendall(nonce_s + _mac(secret, b"sender", nonce_r, nonce_s))
    if not hmac.compare_digest(_read_exactly(sock, _MAC), _mac(secret, b"receiver", nonce_s, nonce_r)):
        raise Unauthenticated("the KV receiver does not know this cluster's secret")


def verify(sock: socket.socket, secret: bytes) -> None:
    """Receiver side of the handshake: returns once the sender has proved the secret."""
    nonce_r = secrets.token_bytes(_NONCE)
    sock.sendall(MAGIC + nonce_r)
    answer = _read_exactly(sock, _NONCE + _MAC)
    nonce_s, proof = answer[:_NONCE], answer[_NONCE:]
    if not hmac.compare_digest(proof, _mac(secret, b"sender", nonce_r, nonce_s)):
        raise Unauthenticated("wrong proof of the cluster's secret")
    sock.sendall(_mac(secret, b"receiver", nonce_s, nonce_r))


def grpc_token(secret: bytes) -> str:
    return _mac(secret, b"grpc").hex()


def grpc_token_ok(metadata, secret: bytes) -> bool:
    presented = next((value for key, value in metadata if key == GRPC_TOKEN_KEY), "")
    return isinstance(presented, str) and hmac.compare_digest(presented.encode(), grpc_token(secret).encode())


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            part = sock.recv(n - len(buf))
        except OSError as e:  # a timeout included: a silent peer never gets further
            raise Unauthenticated(f"handshake not completed: {e or type(e).__name__}") from None
        if not part:
            raise Unauthenticated("the peer closed the connection during the handshake")
        buf += part
    return bytes(buf)
