"""The cluster secret, and how a KV connection proves it before anything is accepted.

cluster/ makes a random secret at start-up and hands it to every worker through Ray (inside
the trust boundary). It never travels on a KV socket:

  nccl backend, our control socket: mutual challenge/response (HMAC-SHA256)
    receiver -> sender   MAGIC + nonce_r
    sender -> receiver   nonce_s + HMAC(secret, "sender" | nonce_r | nonce_s)
    receiver -> sender   HMAC(secret, "receiver" | nonce_s | nonce_r)
  The receiver checks the sender's proof before reading anything else; the sender checks the
  receiver's before sending any KV (an impostor listening on the address learns nothing).

  grpc backend, the same exchange on the stream's headers and first message:
    sender -> receiver   metadata: nonce_s
    receiver -> sender   initial metadata: nonce_r, HMAC(secret, "grpc-receiver" | nonce_s | nonce_r)
    sender -> receiver   first message: HMAC(secret, "grpc-sender" | nonce_r | nonce_s)
  The sender checks the receiver's proof before its first message; the receiver reads nothing
  but the proof until it checks out. Nothing a listener sees can be replayed to another stream.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time

MAGIC = b"PDKV1"
_NONCE = 32
_MAC = hashlib.sha256().digest_size
GRPC_NONCE_KEY = "x-pdserve-kv-nonce"
GRPC_PROOF_KEY = "x-pdserve-kv-proof"


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
    """Sender side of the handshake, all of it within the socket's timeout."""
    deadline = time.monotonic() + sock.gettimeout()
    hello = _read_exactly(sock, len(MAGIC) + _NONCE, deadline)
    if not hello.startswith(MAGIC):
        raise Unauthenticated("the peer is not a pdserve KV receiver")
    nonce_r, nonce_s = hello[len(MAGIC) :], secrets.token_bytes(_NONCE)
    _send(sock, nonce_s + _mac(secret, b"sender", nonce_r, nonce_s))
    if not hmac.compare_digest(_read_exactly(sock, _MAC, deadline), _mac(secret, b"receiver", nonce_s, nonce_r)):
        raise Unauthenticated("the KV receiver does not know this cluster's secret")


def verify(sock: socket.socket, secret: bytes) -> None:
    """Receiver side of the handshake: returns once the sender has proved the secret, all of it
    within the socket's timeout (a peer dripping a byte at a time gets no longer)."""
    deadline = time.monotonic() + sock.gettimeout()
    nonce_r = secrets.token_bytes(_NONCE)
    _send(sock, MAGIC + nonce_r)
    answer = _read_exactly(sock, _NONCE + _MAC, deadline)
    nonce_s, proof = answer[:_NONCE], answer[_NONCE:]
    if not hmac.compare_digest(proof, _mac(secret, b"sender", nonce_r, nonce_s)):
        raise Unauthenticated("wrong proof of the cluster's secret")
    _send(sock, _mac(secret, b"receiver", nonce_s, nonce_r))


class GrpcProver:
    """The sender's half of the grpc exchange, for one stream."""

    def __init__(self, secret: bytes):
        self.secret, self.nonce = secret, secrets.token_bytes(_NONCE)
        self.metadata = ((GRPC_NONCE_KEY, self.nonce.hex()),)

    def answer(self, initial_metadata) -> bytes:
        """The sender's proof, once the receiver's headers have proved the secret."""
        headers = dict(initial_metadata or ())
        nonce_r = _nonce(headers.get(GRPC_NONCE_KEY))
        proof = headers.get(GRPC_PROOF_KEY, "")
        if nonce_r is None or not isinstance(proof, str):
            raise Unauthenticated("the peer is not a pdserve KV receiver")
        if not hmac.compare_digest(proof.encode(), _mac(self.secret, b"grpc-receiver", self.nonce, nonce_r).hex().encode()):
            raise Unauthenticated("the KV receiver does not know this cluster's secret")
        return _mac(self.secret, b"grpc-sender", nonce_r, self.nonce)


def grpc_challenge(invocation_metadata, secret: bytes) -> tuple[tuple, bytes]:
    """The receiver's half: (its initial metadata, the proof the sender's first message must be)."""
    nonce_s = _nonce(dict(invocation_metadata or ()).get(GRPC_NONCE_KEY))
    if nonce_s is None:
        raise Unauthenticated("the stream carries no KV handshake")
    nonce_r = secrets.token_bytes(_NONCE)
    headers = ((GRPC_NONCE_KEY, nonce_r.hex()), (GRPC_PROOF_KEY, _mac(secret, b"grpc-receiver", nonce_s, nonce_r).hex()))
    return headers, _mac(secret, b"grpc-sender", nonce_r, nonce_s)


def _nonce(text) -> bytes | None:
    if not isinstance(text, str) or len(text) != 2 * _NONCE:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as e:
        raise Unauthenticated(f"handshake not completed: {e or type(e).__name__}") from None


def _read_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            sock.settimeout(max(1e-3, deadline - time.monotonic()))
            part = sock.recv(n - len(buf))
        except OSError as e:  # a timeout included: a silent peer never gets further
            raise Unauthenticated(f"handshake not completed: {e or type(e).__name__}") from None
        if not part:
            raise Unauthenticated("the peer closed the connection during the handshake")
        buf += part
    return bytes(buf)
