"""Locust scenarios against Ember's OpenAI-compatible API, recording time to first token, time per
output token, end-to-end latency and token counts by cold-start state.

Run them with `ember loadtest SCENARIO` (bounded users, time and request count; it deploys what the
scenario needs and writes the reports). Locust must run in its own process: importing it after
boto3/urllib3/redis breaks gevent's patching. The plan (functions, keys, rates) comes from the
environment as JSON in EMBER_LOAD_PLAN, written by `ember loadtest`:

    {"scenario": "cold", "functions": ["lt-cold-0-0", ...], "keys": {"default": "KEY"},
     "max_tokens": 16, "rate_per_user": 1.0, "burst_period_s": 8.0, "max_requests": 10000}

Scenarios (user classes, picked by name on locust's command line):
- `SteadyUser`: warm traffic, each user at `rate_per_user` requests/s, one function kept warm;
- `ColdUser`: random functions out of many over a few checkpoints, each kept alive shorter than
  the gap between its calls, so most calls are cold starts (a cold call is repeated at once: the
  repeat is the warm sample of the same function under the same load);
- `BurstUser`: every user fires at the same instants (waves `burst_period_s` apart), after every
  function has scaled to zero;
- `FloodTenant` and `SteadyTenant`: two keys on one function, one flooding (no pause), one at
  `rate_per_user`; a 429 given to the flooding tenant is its rate limit working, not a failure.

The HTTP rows (`chat (headers)`) measure time to response headers only (stream=True), so every
measure is a custom event named by state: `cold/<tier>/ttft`, `cold/<tier>/tpot`, `cold/<tier>/e2e`,
`cold/<tier>/startup` (the worker's x-ember-startup-ms), `warm/ttft`, `warm/tpot`, `warm/e2e`;
each event's response_length is the request's completion tokens. Tenants' events have the request
type `LLM:<tenant>`. Each finished request is also one JSON line in EMBER_LOAD_SAMPLES (seconds,
unrounded: locust rounds response times above 100 ms to two significant digits).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time

import gevent
from locust import HttpUser, between, constant, constant_throughput, events, task

PLAN = json.loads(os.environ.get("EMBER_LOAD_PLAN") or "{}")
FUNCTIONS: list[str] = PLAN.get("functions") or [os.environ.get("EMBER_LOAD_FUNCTION", "tiny")]
KEYS: dict[str, str] = PLAN.get("keys") or {"default": os.environ.get("EMBER_API_KEY", "")}
MAX_TOKENS = int(PLAN.get("max_tokens", os.environ.get("EMBER_LOAD_MAX_TOKENS", "16")))
RATE_PER_USER = float(PLAN.get("rate_per_user", 1.0))
BURST_PERIOD_S = float(PLAN.get("burst_period_s", 8.0))
MAX_REQUESTS = int(PLAN.get("max_requests", 10000))
PROMPT = PLAN.get("prompt", "Tell me a story")
SAMPLES_PATH = os.environ.get("EMBER_LOAD_SAMPLES")

_sent = itertools.count(1)
_samples = open(SAMPLES_PATH, "a", buffering=1) if SAMPLES_PATH else None  # noqa: SIM115 - lives with the process
_burst_t0: list[float] = []
_user_index = itertools.count()


def _over_budget(user: HttpUser) -> bool:
    """Stop the whole run once it has sent MAX_REQUESTS (bounded in count as well as time)."""
    if next(_sent) <= MAX_REQUESTS:
        return False
    runner = user.environment.runner
    if runner is not None:
        gevent.spawn(runner.quit)  # not from this greenlet: quitting kills the users' greenlets
    return True


def stream_chat(user: HttpUser, function: str, tenant: str = "default") -> dict | None:
    """One streamed chat completion; fires the custom events and returns the sample (None on failure)."""
    body = {"model": function, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {KEYS.get(tenant) or KEYS.get('default', '')}"}
    name = "chat (headers)" if tenant == "default" else f"{tenant} chat (headers)"
    t0 = time.perf_counter()
    t_first = None
    chunks = 0
    usage_tokens = None
    with user.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True, headers=headers,
                          name=name) as resp:
        if resp.status_code == 429 and tenant == "flood":
            resp.success()  # the flooding tenant's rate limit doing its job
            _fire(tenant, "throttled", "e2e", time.perf_counter() - t0, 0)
            return None
        if resp.status_code != 200:
            resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            return None
        done = False
        try:
            for line in resp.iter_lines():
                if line == b"data: [DONE]":
                    done = True
                    continue
                if not line or not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # the stream failed after it began: the gateway's error event
                    err = chunk["error"] or {}
                    resp.failure(f"stream error: {err.get('code', 'error')}: {str(err.get('message', ''))[:200]}")
                    return None
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                    chunks += 1
                    t_first = t_first or time.perf_counter()
        except Exception as e:  # a broken stream is a failed request, whatever broke it
            resp.failure(f"stream broke: {e!r}")
            return None
        if not done:
            resp.failure("stream ended without [DONE]")
            return None
        t_end = time.perf_counter()
        resp.success()
        cold = resp.headers.get("x-ember-cold-start") == "true"
        tier = resp.headers.get("x-ember-load-tier", "unknown")
        startup_ms = float(resp.headers.get("x-ember-startup-ms") or 0)
    tokens = usage_tokens if usage_tokens is not None else chunks
    state = f"cold/{tier}" if cold else "warm"
    ttft = (t_first or t_end) - t0
    tpot = (t_end - t_first) / (tokens - 1) if tokens > 1 and t_first is not None else None
    _fire(tenant, state, "ttft", ttft, tokens)
    _fire(tenant, state, "e2e", t_end - t0, tokens)
    if tpot is not None:
        _fire(tenant, state, "tpot", tpot, tokens)
    if cold:
        _fire(tenant, state, "startup", startup_ms / 1000, tokens)
    sample = {"t": time.time(), "tenant": tenant, "function": function, "cold": cold, "tier": tier,
              "ttft_s": ttft, "tpot_s": tpot, "e2e_s": t_end - t0, "tokens": tokens, "startup_ms": startup_ms}
    if _samples is not None:
        _samples.write(json.dumps(sample) + "\n")
    return sample


def _fire(tenant: str, state: str, measure: str, seconds: float, tokens: int) -> None:
    events.request.fire(request_type="LLM" if tenant == "default" else f"LLM:{tenant}", name=f"{state}/{measure}",
                        response_time=seconds * 1000, response_length=tokens, exception=None, context={})


class SteadyUser(HttpUser):
    """Warm traffic at a set rate per user."""

    wait_time = constant_throughput(RATE_PER_USER)

    @task
    def chat(self) -> None:
        if not _over_budget(self):
            stream_chat(self, random.choice(FUNCTIONS))


class ColdUser(HttpUser):
    """Random functions among many, kept alive shorter than their gaps: cold starts from every tier."""

    wait_time = between(0.1, 0.4)

    @task
    def chat(self) -> None:
        if _over_budget(self):
            return
        fn = random.choice(FUNCTIONS)
        sample = stream_chat(self, fn)
        if sample is not None and sample["cold"] and not _over_budget(self):
            stream_chat(self, fn)  # warm, right after its own cold start


class BurstUser(HttpUser):
    """Every user fires at once, in waves BURST_PERIOD_S apart (functions scale to zero between waves)."""

    def wait_time(self) -> float:
        if not _burst_t0:
            return 0.0
        since = time.time() - _burst_t0[0]
        return BURST_PERIOD_S - since % BURST_PERIOD_S

    def on_start(self) -> None:
        if not _burst_t0:
            _burst_t0.append(time.time())
        self.function = FUNCTIONS[next(_user_index) % len(FUNCTIONS)]  # users spread over the functions

    @task
    def chat(self) -> None:
        if not _over_budget(self):
            stream_chat(self, self.function)


class FloodTenant(HttpUser):
    """The tenant that floods: no pause between requests."""

    weight = 3
    wait_time = constant(0)

    @task
    def chat(self) -> None:
        if not _over_budget(self):
            stream_chat(self, FUNCTIONS[0], tenant="flood")


class SteadyTenant(HttpUser):
    """The tenant that behaves: one user at RATE_PER_USER requests/s."""

    fixed_count = 1
    wait_time = constant_throughput(RATE_PER_USER)

    @task
    def chat(self) -> None:
        if not _over_budget(self):
            stream_chat(self, FUNCTIONS[0], tenant="steady")
