"""One push or remove of a name at a time in an S3 store (ember.loader.s3lock), against moto's
server: pushes of different checkpoints under one name, and removes, racing; a holder that died;
a holder that lost its lease."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ember.errors import CheckpointNotFound, StoreError
from ember.loader import open_store
from ember.loader.s3lock import S3NameLock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def other_converted(other_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ember.loader.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("conv-other") / "other"
    convert_checkpoint(other_model_dir, out)
    return out


def test_racing_pushes_and_removes_leave_a_whole_checkpoint_or_none(
    s3_env: str, tiny_converted: Path, other_converted: Path, make_tiers, tmp_path: Path
) -> None:
    """Two pushes of different checkpoints under one name and a remove, at once, round after round:
    afterwards the name is absent or loads and verifies (before: one push's manifest over the
    other's files failed every load's checksums, or a manifest was left whose files were removed)."""
    store = open_store(s3_env)
    errors: list[BaseException] = []

    def run(fn, *args) -> None:  # noqa: ANN001
        try:
            fn(*args)
        except CheckpointNotFound:
            pass  # the remove came first
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    for i in range(5):
        threads = [threading.Thread(target=run, args=(store.push, tiny_converted, "m")),
                   threading.Thread(target=run, args=(store.push, other_converted, "m"))]
        if i % 2:
            threads.append(threading.Thread(target=run, args=(store.remove, "m")))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        if store.exists("m"):  # a fresh node each round: every byte comes from the store
            make_tiers(tmp_path / f"node-{i}", s3_env).load(f"{s3_env}/m").release()
    assert [c.name for c in store.list()] in ([], ["m"])  # the lease objects are not checkpoints


def test_a_dead_holders_lease_is_taken_over_and_a_live_one_is_waited_for(
    s3_env: str, tiny_converted: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="ember.loader.s3lock")
    store = open_store(s3_env)
    store.lease_stale_s, store.lease_renew_s = 4.0, 0.5  # ages are whole seconds (HTTP dates)
    dead = store._lease("a", "push")  # acquired, then its holder dies: never renewed, never released
    dead.acquire()
    dead._stop.set()
    t0 = time.monotonic()
    store.push(tiny_converted, "a")
    assert time.monotonic() - t0 >= 2.0 and store.exists("a")  # waited for it to go stale

    live = store._lease("b", "push")
    live.acquire()
    pushed = threading.Event()
    pusher = threading.Thread(target=lambda: (store.push(tiny_converted, "b"), pushed.set()))
    pusher.start()
    try:
        time.sleep(5.0)  # past stale_s: the holder renews, so the push keeps waiting
        assert not pushed.is_set() and not store.exists("b")
    finally:
        live.release()
    pusher.join(30)
    assert pushed.is_set() and store.exists("b")
    assert "another client is changing this name" in caplog.text  # the waiting push says why it waits


def test_a_holder_that_lost_its_lease_publishes_nothing_and_leaves_the_new_holders(s3_env: str) -> None:
    store = open_store(s3_env)
    key = f"{store.prefix}/.locks/c"
    paused = S3NameLock(store.client, store.bucket, key, what="push c", stale_s=1.0, renew_s=0.3)
    paused.acquire()
    paused._stop.set()  # the holder pauses: no renewal
    paused._renewer.join()
    time.sleep(2.5)
    taker = S3NameLock(store.client, store.bucket, key, what="push c", stale_s=1.0, renew_s=0.3)
    taker.acquire()  # takes the stale lease over
    paused._stop.clear()  # the holder wakes up: its next renewal finds the lease taken
    paused._renewer = threading.Thread(target=paused._renew)
    paused._renewer.start()
    deadline = time.monotonic() + 10
    while not paused.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(StoreError, match="lost the lease"):
        paused.check()  # what a push asks before it writes its manifest
    paused.release()  # must not delete the taker's lease
    assert store.client.get_object(Bucket=store.bucket, Key=key)["ETag"] == taker.etag
    taker.check()
    taker.release()
    with pytest.raises(Exception, match="NoSuchKey|Not Found|404"):
        store.client.get_object(Bucket=store.bucket, Key=key)


def test_a_holder_that_wakes_after_a_takeover_asks_the_store_not_its_stale_renewer(s3_env: str) -> None:
    """A paused process wakes with its renewer as stale as the rest of it: the push's `check` right
    after waking passed on the renewer's last word (not lost), and the push wrote its manifest over
    the taker's files; its release deleted the taker's lease."""
    store = open_store(s3_env)
    key = f"{store.prefix}/.locks/w"
    paused = S3NameLock(store.client, store.bucket, key, what="push w", stale_s=1.0, renew_s=0.3)
    paused.acquire()
    paused._stop.set()  # the whole process pauses, its renewer too
    paused._renewer.join()
    paused._stop.clear()
    time.sleep(2.5)
    taker = S3NameLock(store.client, store.bucket, key, what="push w", stale_s=1.0, renew_s=0.3)
    taker.acquire()  # takes the stale lease over
    assert not paused.lost  # nothing told the paused holder yet
    with pytest.raises(StoreError, match="lost the lease"):
        paused.check()  # asked at once on waking, before any renewal ran
    paused.release()
    assert store.client.get_object(Bucket=store.bucket, Key=key)["ETag"] == taker.etag  # the taker's, intact
    taker.check()  # a holder's own check renews and passes
    taker.release()
    with pytest.raises(Exception, match="NoSuchKey|Not Found|404"):
        store.client.get_object(Bucket=store.bucket, Key=key)


def test_a_server_without_conditional_writes_pushes_without_a_lease(
    s3_env: str, tiny_converted: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An S3-protocol server that answers a conditional write with 501: the push goes on, as
    before leases, and says so in the log; it does not fail."""
    from botocore.exceptions import ClientError

    store = open_store(s3_env)
    real_put = store.client.put_object

    def put_object(**kw):  # noqa: ANN003, ANN202
        if "IfNoneMatch" in kw or "IfMatch" in kw:
            raise ClientError({"Error": {"Code": "NotImplemented"}, "ResponseMetadata": {"HTTPStatusCode": 501}},
                              "PutObject")
        return real_put(**kw)

    monkeypatch.setattr(store.client, "put_object", put_object)
    with caplog.at_level("WARNING", logger="ember.loader.s3lock"):
        store.push(tiny_converted, "d")
    assert store.exists("d") and "no conditional writes" in caplog.text


def test_the_cli_push_waits_for_a_held_name_and_says_why(s3_env: str, tiny_converted: Path) -> None:
    """The user's route: `ember checkpoint push` (a process of its own) while another client holds
    the name waits, prints why on stderr, and publishes once the holder lets go."""
    import subprocess
    import sys

    store = open_store(s3_env)
    held = store._lease("e", "push")
    held.acquire()
    push = subprocess.Popen([sys.executable, "-m", "ember", "checkpoint", "push", str(tiny_converted), "e",
                             "--store", s3_env], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(push.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 60  # the CLI starts (a few seconds) and reaches the held name
        while time.monotonic() < deadline and push.poll() is None and \
                not any("another client is changing this name" in line for line in err_lines):
            time.sleep(0.1)
        assert push.poll() is None and not store.exists("e"), "".join(err_lines)  # it waits; nothing published
        assert any("another client is changing this name" in line for line in err_lines)  # and says why
    finally:
        held.release()
    out = push.stdout.read() if push.stdout else ""  # type: ignore[union-attr]
    assert push.wait(120) == 0, "".join(err_lines)
    reader.join(10)
    assert json.loads(out.strip().splitlines()[-1]) == {"name": "e", "nbytes": store.manifest("e").tensor_nbytes}
