"""The read pipeline's thread pools and the DRAM tier's huge-page detection."""

from __future__ import annotations

import os
import threading
import time

import pytest

from ember.loader.pipeline import run_parallel
from ember.loader.shm import huge_tmpfs_in

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
tmpfs /mnt/huge tmpfs rw,relatime,size=6291456k,huge=always 0 0
tmpfs /mnt/within tmpfs rw,relatime,huge=within_size 0 0
tmpfs /mnt/huge/never tmpfs rw,relatime,huge=never 0 0
"""


def test_run_parallel_keeps_its_threads_between_calls() -> None:
    local = threading.local()
    marked, fresh = [], []

    def mark(_: int) -> None:
        time.sleep(0.005)
        local.seen = True
        marked.append(threading.current_thread().name)

    def check(_: int) -> None:
        time.sleep(0.005)
        if not getattr(local, "seen", False):
            fresh.append(threading.current_thread().name)

    run_parallel(mark, list(range(16)), 3, "test-keep")
    run_parallel(check, list(range(16)), 3, "test-keep")
    assert 1 < len(set(marked)) <= 3
    assert fresh == []  # every job of the second call ran on a thread started by the first


def test_run_parallel_raises_the_first_error_after_running_jobs_end() -> None:
    finished = threading.Event()

    def job(i: int) -> None:
        if i == 0:
            raise ValueError("chunk 0 is bad")
        if i == 1:
            time.sleep(0.2)
            finished.set()

    with pytest.raises(ValueError, match="chunk 0"):
        run_parallel(job, list(range(40)), 4, "test-error")
    # the caller may free its buffer now: nothing still writes into it
    assert finished.is_set()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_run_parallel_works_in_a_forked_child() -> None:
    run_parallel(lambda _: None, list(range(8)), 2, "test-fork")  # the parent has the pool's threads
    pid = os.fork()
    if pid == 0:  # child: the parent's threads do not exist here
        try:
            out: list[int] = []
            run_parallel(out.append, list(range(8)), 2, "test-fork")
            os._exit(0 if sorted(out) == list(range(8)) else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("run_parallel hung in a forked child")


@pytest.mark.parametrize(
    ("target", "forced", "expected"),
    [
        ("/dev/shm/ember-abc", False, False),
        ("/dev/shm/ember-abc", True, True),
        ("/mnt/huge/ember-abc", False, True),
        ("/mnt/within/ember-abc", False, True),
        ("/mnt/huge/never/ember-abc", False, False),  # the longest mount point decides
        ("/mnt/hugepages/ember-abc", False, False),  # a prefix of a name is not a parent
        ("/var/tmp/ember-abc", True, False),  # not a tmpfs at all
    ],
)
def test_huge_tmpfs_detection(target: str, forced: bool, expected: bool) -> None:
    assert huge_tmpfs_in(target, MOUNTS, forced=forced) is expected


def test_in_order_sha256_of_chunks_landing_in_any_order_on_many_threads() -> None:
    import hashlib
    import random

    from ember.loader.remote import _InOrderSha256

    data = memoryview(os.urandom((5 << 20) + 12345))
    base, size, chunk = 1000, len(data) - 1000, 256 << 10
    order = list(range(-(-size // chunk)))
    random.Random(7).shuffle(order)
    digest = _InOrderSha256(data, base, size, chunk)
    run_parallel(lambda i: (time.sleep(random.random() / 1000), digest.landed(i)), order, 6, "test-sha")
    assert digest.hexdigest() == hashlib.sha256(data[base:]).hexdigest()

    partial = _InOrderSha256(data, base, size, chunk)
    for i in order[:-1]:
        partial.landed(i)
    with pytest.raises(Exception, match="before chunk"):
        partial.hexdigest()  # one chunk never landed: no digest over a hole
