"""A checkpoint's identity: the store it comes from and the digest of its manifest.

Two stores may both hold a checkpoint called "victim"; a store may replace "victim" with other
bytes. Node tiers therefore never key an entry by a bare name: an entry's key is the name plus a
hash of (store URI, manifest digest), and the manifest digest pins every byte (the manifest holds
the sha256 of every partition and model file). The canonical ref `STORE/NAME#DIGEST` travels from
the gateway (which learns it at deploy) to the workers, whose heartbeats publish holdings under it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ember.errors import InvalidName
from ember.loader.names import validate_name

_DIGEST = re.compile(r"[0-9a-f]{64}")
# An entry key: a checkpoint name, '@' (never part of a name), 16 hex digits of the identity hash.
ENTRY_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}@[0-9a-f]{16}")


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which bytes a checkpoint is: its store's canonical URI, its name there, its manifest digest."""

    store_uri: str
    name: str
    digest: str  # sha256 hex of manifest.json as stored

    @property
    def key(self) -> str:
        """The tier entry key (a directory and index name on the node)."""
        h = hashlib.sha256(f"{self.store_uri}\n{self.name}\n{self.digest}".encode()).hexdigest()[:16]
        return f"{self.name}@{h}"

    @property
    def ref(self) -> str:
        """The canonical ref: `STORE_URI/NAME#DIGEST` (what deploys pin and heartbeats publish)."""
        return f"{self.store_uri.rstrip('/')}/{self.name}#{self.digest}"


def manifest_digest(raw: bytes) -> str:
    """The digest that names a manifest's bytes."""
    return hashlib.sha256(raw).hexdigest()


def split_digest(ref: str) -> tuple[str, str | None]:
    """(ref without '#DIGEST', digest or None); a malformed digest is an InvalidName."""
    base, sep, digest = ref.partition("#")
    if not sep:
        return ref, None
    if not _DIGEST.fullmatch(digest):
        raise InvalidName(f"invalid checkpoint digest in {ref!r}: expected 64 lowercase hex digits")
    return base, digest


def is_entry_key(key: str) -> bool:
    """Whether `key` has the shape of a tier entry key."""
    if not ENTRY_KEY_PATTERN.fullmatch(key):
        return False
    validate_name(key.rpartition("@")[0])
    return True
