"""A chaos driver for a running `ember up` (ember.platform.supervisor.Platform): seeded load on
several functions while faults are injected, each fault one function, and the invariants checked
afterwards from Redis and the workers.

Faults: SIGKILL a worker (the supervisor restarts it), pause a worker (SIGSTOP, SIGCONT after a
while), SIGKILL Redis (the supervisor restarts it from its AOF), a client that drops its stream
mid-way, a flipped byte in a node's SSD-tier partition, a full disk under the SSD tiers (where the
test gives the nodes a small filesystem: tests/platform/smalldisk.py).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from ember.platform.state import Keys
from tests.platform.conftest import flip_byte

PROMPTS = ["Hello", "Tell me a story", "What is Ember?", "Count to five", "The sky is"]


@dataclass
class Outcome:
    kind: str  # "complete" | "error" (a clear error: OpenAI error shape) | "dropped" | "bad"
    detail: str = ""


@dataclass
class Chaos:
    platform: Any  # ember.platform.supervisor.Platform
    admin_key: str
    functions: list[str]
    seed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    reference: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    degraded_seen: int = 0
    checkpoint: str = "tiny"  # the functions' checkpoint: fresh copies of it answer as it does
    no_small_disk: str = ""  # why fill_ssd is skipped; "" when <data_dir>/nodes is a small filesystem
    cold_starts: Counter = field(default_factory=Counter)  # load tier -> cold starts answered
    cold_starts_while_full: Counter = field(default_factory=Counter)  # the same, while the disk was full
    full_s: float = 0.0  # seconds the disk was full, all fills together
    faults_while_full: Counter = field(default_factory=Counter)
    filler: Path | None = None
    full: threading.Event = field(default_factory=threading.Event)
    _full_since: float = 0.0
    _full_faults_left: int = 0
    _fresh: int = 0

    @property
    def url(self) -> str:
        return self.platform.url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    # --- load -------------------------------------------------------------------------------
    def body(self, fn: str, prompt: str, stream: bool) -> dict[str, Any]:
        return {"model": fn, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                "temperature": 0, "stream": stream}

    def learn_reference(self) -> None:
        """Greedy answers before any fault: what every later complete answer must equal."""
        for prompt in PROMPTS:
            r = httpx.post(f"{self.url}/v1/chat/completions", headers=self.headers, timeout=120,
                           json=self.body(self.functions[0], prompt, False))
            r.raise_for_status()
            self.reference[prompt] = r.json()["choices"][0]["message"]["content"]

    def request(self, rng: random.Random, client: httpx.Client) -> Outcome:
        fn, prompt, stream = rng.choice(self.functions), rng.choice(PROMPTS), rng.random() < 0.5
        return self.invoke(client, fn, prompt, stream)

    def invoke(self, client: httpx.Client, fn: str, prompt: str, stream: bool) -> Outcome:
        """One chat completion, judged: complete (the reference text), a clear error, or bad."""
        try:
            if not stream:
                r = client.post(f"{self.url}/v1/chat/completions", json=self.body(fn, prompt, False))
                if r.status_code == 200:
                    self.count_cold_start(r.headers)
                    return self.check_text(prompt, r.json()["choices"][0]["message"]["content"])
                return self.clear_error(r.status_code, r.text)
            text, done = "", False
            with client.stream("POST", f"{self.url}/v1/chat/completions", json=self.body(fn, prompt, True)) as r:
                if r.status_code != 200:
                    return self.clear_error(r.status_code, r.read().decode(errors="replace"))
                self.count_cold_start(r.headers)
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        return self.clear_error(200, data)
                    for ch in ev["choices"]:
                        text += ch["delta"].get("content") or ""
            return self.check_text(prompt, text) if done else Outcome("bad", "stream ended without [DONE]")
        except httpx.HTTPError as e:
            return Outcome("bad", f"client saw {e.__class__.__name__}: {e}")

    def count_cold_start(self, headers: httpx.Headers) -> None:
        if headers.get("x-ember-cold-start") == "true":
            tier = headers.get("x-ember-load-tier", "?")
            with self.lock:
                self.cold_starts[tier] += 1
                if self.full.is_set():
                    self.cold_starts_while_full[tier] += 1

    def check_text(self, prompt: str, text: str) -> Outcome:
        if text != self.reference[prompt]:
            return Outcome("bad", f"wrong text for {prompt!r}: {text!r} != {self.reference[prompt]!r}")
        return Outcome("complete")

    @staticmethod
    def clear_error(status: int, body: str) -> Outcome:
        try:
            err = json.loads(body)["error"]
            if err.get("message") and err.get("code") and status >= 400 or status == 200:
                return Outcome("error", f"{status} {err.get('code')}")
        except (ValueError, KeyError, TypeError):
            pass
        return Outcome("bad", f"unclear error {status}: {body[:200]}")

    def client_loop(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + k)
        with httpx.Client(headers=self.headers, timeout=httpx.Timeout(60.0, connect=5.0)) as client:
            while not self.stop.is_set():
                out = self.request(rng, client)
                with self.lock:
                    self.outcomes.append(out)

    # --- faults (one function each) -----------------------------------------------------------
    def workers(self) -> list[tuple[str, Any]]:
        return [(n, p) for n, p in self.platform.children if n != "gateway" and p.poll() is None]

    def serving(self, live: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Of `live`, the workers with requests in flight, else those holding instances, else all:
        a fault on an idle node tests little."""
        try:
            fns = httpx.get(f"{self.url}/v1/stats/functions", headers=self.headers, timeout=5).json()["functions"]
        except (httpx.HTTPError, ValueError, KeyError):
            return live
        busy = {i["node"] for f in fns for i in f["instances"] if i["outstanding"] > 0}
        held = {i["node"] for f in fns for i in f["instances"]}
        for nodes in (busy, held):
            chosen = [(n, p) for n, p in live if n in nodes]
            if chosen:
                return chosen
        return live

    def kill_worker(self, rng: random.Random) -> None:
        live = self.workers()
        if len(live) > 1:  # keep one serving: the point is recovery, not an outage
            _, proc = rng.choice(self.serving(live))
            os.kill(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 6  # /readyz must say so while the worker is missing
            while time.monotonic() < deadline and not self.stop.is_set():
                try:
                    r = httpx.get(f"{self.url}/readyz", timeout=2)
                    if r.status_code == 503 and r.json().get("status") == "degraded":
                        self.degraded_seen += 1
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.2)

    def pause_worker(self, rng: random.Random) -> None:
        live = self.workers()
        if live:
            _, proc = rng.choice(self.serving(live))
            os.kill(proc.pid, signal.SIGSTOP)
            self.stop.wait(rng.uniform(1.0, 4.0))
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def restart_redis(self, rng: random.Random) -> None:
        if self.platform.redis is not None and self.platform.redis.proc is not None:
            os.kill(self.platform.redis.proc.pid, signal.SIGKILL)

    def drop_stream(self, rng: random.Random) -> None:
        fn = rng.choice(self.functions)
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", headers=self.headers, timeout=30,
                              json={**self.body(fn, rng.choice(PROMPTS), True), "max_tokens": 200}) as r:
                for _ in r.iter_lines():
                    break  # the first line, then the client goes away
        except httpx.HTTPError:
            pass
        with self.lock:
            self.outcomes.append(Outcome("dropped"))

    def flip_tier_byte(self, rng: random.Random) -> None:
        """One flipped byte in a partition of a node's SSD-tier copy of a checkpoint (verified when
        loaded: the worker drops the entry and loads from the next tier or the store)."""
        files = sorted((self.platform.data_dir / "nodes").glob("*/ssd/*/part-*.bin"))
        if files:
            f = rng.choice(files)
            try:
                flip_byte(f, rng.randrange(max(1, f.stat().st_size)), 0x40)
            except FileNotFoundError:  # the entry was evicted meanwhile
                pass

    def fill_ssd(self, rng: random.Random) -> None:
        """A full disk under the SSD tiers: a filler file in one node's SSD tier written until
        ENOSPC (the nodes share the small disk, as `ember up`'s workers share a machine's), kept
        across the next one or two faults (a worker restarted, Redis restarted, ... on a full
        disk), then removed. Cold starts of the clients' functions are DRAM or SSD hits, which
        write nothing; so a function on a checkpoint no node holds yet is deployed and invoked
        while the disk is full: its load from the store cannot write the SSD tier and must
        serve from memory."""
        if self.no_small_disk or self.filler is not None:
            return
        tiers = sorted((self.platform.data_dir / "nodes").glob("*/ssd"))
        if not tiers:
            return
        self.filler = rng.choice(tiers) / "filler"
        _fill_until_enospc(self.filler)
        self._full_faults_left = rng.randint(1, 2)
        self._full_since = time.monotonic()
        self.full.set()
        self.cold_start_fresh_checkpoint()

    def free_ssd(self) -> None:
        if self.filler is not None:
            self.filler.unlink(missing_ok=True)
            self.filler = None
            self.full.clear()
            self.full_s += time.monotonic() - self._full_since

    def cold_start_fresh_checkpoint(self) -> None:
        """Push a fresh copy of the functions' checkpoint (another name: no tier holds it), deploy
        a function on it and invoke it until one answer is complete (each answer judged)."""
        from ember.loader import open_store

        store = open_store(self.platform.settings.store_url or f"file://{self.platform.data_dir / 'store'}")
        source = self.platform.data_dir / "fresh-source"  # outside the store: push copies it
        if not source.exists():
            shutil.copytree(store.local_dir(self.checkpoint), source)
        self._fresh += 1
        fn = f"fresh-{self._fresh}"
        store.push(source, fn)
        deadline = time.monotonic() + 15  # Redis may be restarting from an earlier fault
        while not self.stop.is_set():
            try:
                r = httpx.put(f"{self.url}/v1/functions/{fn}", headers=self.headers, timeout=30,
                              json={"checkpoint": fn, "scaling": {"max_instances": 1, "keep_alive_s": 3}})
                if r.status_code in (200, 201):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)
        with httpx.Client(headers=self.headers, timeout=httpx.Timeout(60.0, connect=5.0)) as client:
            for _ in range(3):
                out = self.invoke(client, fn, PROMPTS[0], stream=False)
                with self.lock:
                    self.outcomes.append(out)
                if out.kind != "error" or self.stop.is_set():
                    break
                time.sleep(0.5)

    # A flipped byte in the DRAM tier is caught by the worker's scrub within its interval, not at
    # once, so it is not injected here.
    FAULTS = ("kill_worker", "pause_worker", "restart_redis", "drop_stream", "flip_tier_byte", "fill_ssd")

    def fault_loop(self, every_s: float) -> None:
        rng = random.Random(self.seed)
        order: list[str] = []
        try:
            while not self.stop.wait(rng.uniform(0.5, 1.5) * every_s):
                if not order:  # every fault once per round, in a seeded order
                    order = list(self.FAULTS)
                    rng.shuffle(order)
                name = order.pop()
                self.faults[name] += 1
                was_full = self.filler is not None
                getattr(self, name)(rng)
                if was_full:
                    self.faults_while_full[name] += 1
                    self._full_faults_left -= 1
                    if self._full_faults_left <= 0:
                        self.free_ssd()
        finally:
            self.free_ssd()

    def run(self, duration_s: float, clients: int = 4, every_s: float = 3.0) -> None:
        threads = [threading.Thread(target=self.client_loop, args=(k,), daemon=True) for k in range(clients)]
        threads.append(threading.Thread(target=self.fault_loop, args=(every_s,), daemon=True))
        for t in threads:
            t.start()
        self.stop.wait(duration_s)
        self.stop.set()
        for t in threads:
            t.join(90)

    # --- invariants -------------------------------------------------------------------------
    def violations(self, redis_url: str, token: str, settle_s: float = 30.0) -> list[str]:
        """Empty when every invariant holds (checked until `settle_s` lets the platform settle)."""
        deadline = time.monotonic() + settle_s
        problems: list[str] = []
        while time.monotonic() < deadline:
            problems = self._check_state(redis_url, token)
            if not problems:
                break
            time.sleep(0.5)
        bad = [o.detail for o in self.outcomes if o.kind == "bad"]
        return bad + problems

    def _check_state(self, redis_url: str, token: str) -> list[str]:
        out: list[str] = []
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            held: dict[str, set[str]] = {}
            for node in r.smembers(Keys.nodes):
                url = r.hget(Keys.node(node), "url")
                try:
                    h = httpx.get(f"{url}/internal/healthz", headers={"x-ember-cluster-token": token}, timeout=3).json()
                    held[node] = set(h["instances"]) | set(h.get("loading", []))
                except (httpx.HTTPError, ValueError, TypeError):
                    out.append(f"node {node} registered but not answering")
            now = time.time()
            booked: Counter = Counter()
            for iid in r.smembers(Keys.instances):
                h = r.hgetall(Keys.instance(iid))
                if not h:
                    out.append(f"instance {iid} indexed without a record")
                    continue
                booked[f"{h['node_id']}/{h['device_id']}"] += int(h["nbytes"])
                slots = r.zcount(Keys.instance_slots(iid), now, "+inf")
                if int(h.get("outstanding", 0)) or slots:
                    out.append(f"instance {iid} has {h.get('outstanding')} outstanding, {slots} live slots")
                if h["state"] in ("claimed", "loading"):
                    if float(h.get("deadline_s", 0) or 0) < now:
                        out.append(f"instance {iid} stuck {h['state']} past its deadline")
                elif iid not in held.get(h["node_id"], set()):
                    out.append(f"instance {iid} ({h['state']}) booked on {h['node_id']}, which does not hold it")
            for node, ids in held.items():
                for iid in ids:
                    if not r.exists(Keys.instance(iid)):
                        out.append(f"worker {node} holds instance {iid} that Redis does not book")
            for member in r.zrange(Keys.devices_free, 0, -1):
                claimed = int(r.hget(Keys.device(*member.split("/", 1)), "claimed_bytes") or 0)
                if claimed != booked.get(member, 0):
                    out.append(f"device {member} claims {claimed} bytes, its instances {booked.get(member, 0)}")
        except redis.RedisError as e:
            out.append(f"redis: {e}")
        finally:
            r.close()
        return out


def _fill_until_enospc(path: Path) -> None:
    """Write zeros to `path` until its filesystem has no byte left (a short write, then ENOSPC)."""
    block = bytes(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return
    finally:
        os.close(fd)
