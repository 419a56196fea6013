"""A lease on one checkpoint name in an S3 store, held while a push or a remove changes it.

S3 has no rename and no lock: a push uploads the files and then the manifest, a remove deletes
the manifest and then the files. Two pushes of one name at once left one's manifest over the
other's files (every load of it then failed its checksums), and a remove between a push's files
and its manifest left a manifest whose files were gone. `FileStore` holds a file lock; here the
lease is an object, `<prefix>/.locks/<name>` (outside every checkpoint's prefix, so `list` and
`remove` never see it):

- taken with a conditional write (`If-None-Match: *`: one writer wins, the others get 412);
- renewed every `renew_s` with `If-Match` on its own ETag, so the holder learns when it lost it;
- taken over when the server's clock says it was not renewed for `stale_s` (a holder that died),
  again with `If-Match` on the stale ETag: of several takers one wins;
- released by deleting it while still held (fresh: renewed within `renew_s`, so nobody took it).

A push checks the lease is still held before it writes the manifest (`check`: a renewal made
there and then, not what the renewer last saw, since a paused process wakes with its renewer as
stale as the rest of it), so a push that lost it (paused past `stale_s`) never publishes a
manifest over another's files; `release` renews the same way before it deletes, so a holder that
lost it never deletes the new holder's lease.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from email.utils import parsedate_to_datetime
from typing import Any

from ember.errors import StoreError

__all__ = ["LOCK_DIR", "S3NameLock"]

log = logging.getLogger(__name__)

LOCK_DIR = ".locks"
_TAKEN = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey", "404")  # 404: If-Match on a gone lease


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3NameLock:
    def __init__(self, client: Any, bucket: str, key: str, *, what: str, stale_s: float = 60.0,
                 renew_s: float = 10.0, poll_s: float = 0.25) -> None:
        if not 0 < renew_s < stale_s:
            raise ValueError("need 0 < renew_s < stale_s")
        self.client, self.bucket, self.key, self.what = client, bucket, key, what
        self.stale_s, self.renew_s, self.poll_s = stale_s, renew_s, poll_s
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost = False
        self.unsupported = False  # the server refused conditional writes: no lease is held
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lock = threading.Lock()  # etag and lost, between the renewer and check/release
        self._renewing = threading.Lock()  # one conditional renewal at a time (each changes the ETag)

    # --- the lease --------------------------------------------------------------------------------
    def __enter__(self) -> S3NameLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Wait while another holder renews the lease; take it when free or stale. An S3-protocol
        server without conditional writes (501) gets no lease: logged, and the change goes on."""
        told = False
        while True:
            try:
                if self._put(IfNoneMatch="*"):
                    break
            except Exception as e:
                if _code(e) not in ("NotImplemented", "501"):
                    raise
                log.warning("%s: the store has no conditional writes; changing the name without a lease", self.what)
                self.unsupported = True
                return
            held = self._read()
            if held is None:
                continue  # released meanwhile: try again at once
            etag, age_s, holder = held
            if age_s > self.stale_s:
                if self._put(IfMatch=etag):
                    log.warning("took over the lease on %s from %s (not renewed for %.0f s)", self.what, holder,
                                age_s)
                    break
                continue
            if not told:
                log.warning("waiting: another client is changing this name (%s; lease held by %s)", self.what, holder)
                told = True
            time.sleep(self.poll_s)
        self._renewer = threading.Thread(target=self._renew, name="s3-lease", daemon=True)
        self._renewer.start()

    def check(self) -> None:
        """Raise StoreError unless the lease is held now: renewed here, with `If-Match` on the ETag
        this holder last wrote (lost when it was not renewed in time and taken over)."""
        if self.unsupported:
            return
        if not self._renew_now():
            raise StoreError(f"{self.what}: lost the lease on the name (paused over {self.stale_s:.0f} s?); "
                             "nothing was published, run it again")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        try:
            held = self._renew_now()  # fresh: nobody takes it now (False: never held, or lost)
        except Exception as e:  # noqa: BLE001 - the lease lapses by itself after stale_s
            log.warning("could not release the lease on %s (%s): it lapses in %.0f s", self.what, e, self.stale_s)
            return
        with self._lock:
            self.etag = None
        if not held:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001 - the lease lapses by itself after stale_s
            log.warning("could not release the lease on %s (%s): it lapses in %.0f s", self.what, e, self.stale_s)

    # --- S3 calls ---------------------------------------------------------------------------------
    def _put(self, **condition: str) -> bool:
        body = json.dumps({"owner": self.owner, "what": self.what}).encode()
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)
        except Exception as e:
            if _code(e) in _TAKEN:
                return False
            raise
        with self._lock:
            self.etag = resp["ETag"]
        return True

    def _read(self) -> tuple[str, float, str] | None:
        """(ETag, seconds since it was last written by the server's clock, holder), None when absent."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        try:
            holder = str(json.loads(resp["Body"].read()).get("owner", "?"))
        except ValueError:
            holder = "?"
        server_now = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(server_now).timestamp() if server_now else time.time()
        return resp["ETag"], now - resp["LastModified"].timestamp(), holder

    def _renew_now(self) -> bool:
        """Renew with `If-Match` on this holder's ETag; False (and `lost`) when another took it."""
        with self._renewing:
            with self._lock:
                etag, lost = self.etag, self.lost
            if etag is None or lost:
                return False
            if self._put(IfMatch=etag):
                return True
            with self._lock:
                self.lost = True
            log.error("lost the lease on %s: another client took it over", self.what)
            return False

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                if not self._renew_now():
                    return
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried; staleness decides
                log.warning("renewing the lease on %s failed: %s", self.what, e)
