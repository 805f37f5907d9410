"""API keys on the public ports (gRPC and HTTP): who may call, and whose requests are whose.

A caller presents `Authorization: Bearer KEY` (an HTTP header, or gRPC metadata). With no key
configured every caller is let in (the default; the ports listen on 127.0.0.1). Otherwise:

  generation   gRPC Generation (Generate, Abort, model info, status), every HTTP /v1 route:
               an API key or an admin key
  admin        gRPC Admin (Scale): an admin key
  open         health (grpc.health.v1, GET /health), GET /version, reflection

A request belongs to the key that made it: Abort acts only on requests made with the same key.
Keys are held and compared as SHA-256 digests, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Auth:
    api_keys: tuple[bytes, ...] = ()  # digests
    admin_keys: tuple[bytes, ...] = ()

    @classmethod
    def from_keys(cls, api_keys: Iterable[str] = (), admin_keys: Iterable[str] = ()) -> "Auth":
        api_keys, admin_keys = tuple(api_keys), tuple(admin_keys)
        if any(not k or k != k.strip() for k in api_keys + admin_keys):
            raise ValueError("API and admin keys must be non-empty, without surrounding spaces")
        return cls(tuple(map(_digest, api_keys)), tuple(map(_digest, admin_keys)))

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    def caller(self, authorization: str | None) -> str | None:
        """Who presents this Authorization value: an id of its key ("" while keys are off), or
        None if it carries no valid key."""
        if not self.enabled:
            return ""
        digest = _bearer_digest(authorization)
        if digest is None or not _member(digest, self.api_keys + self.admin_keys):
            return None
        return digest.hex()[:16]

    def is_admin(self, authorization: str | None) -> bool:
        if not self.enabled:
            return True
        digest = _bearer_digest(authorization)
        return digest is not None and _member(digest, self.admin_keys)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _bearer_digest(authorization: str | None) -> bytes | None:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return _digest(key.strip())


def _member(digest: bytes, digests: tuple[bytes, ...]) -> bool:
    return any(hmac.compare_digest(digest, d) for d in digests)
