"""Locust load test of an Ember gateway: streaming chat completions, recording TTFT, TPOT and
end-to-end latency as custom events, and cold starts (x-ember-cold-start) per load tier.

Run it through loadtests/run.py (bounded users, duration and target: loopback by default).
Locust must run in its own process: importing it after boto3/redis breaks gevent patching.
"""

from __future__ import annotations

import json
import os
import time

from locust import HttpUser, between, events, task

FUNCTION = os.environ.get("EMBER_LOAD_FUNCTION", "tiny")
API_KEY = os.environ.get("EMBER_API_KEY", "")
MAX_TOKENS = int(os.environ.get("EMBER_LOAD_MAX_TOKENS", "16"))


class ChatUser(HttpUser):
    wait_time = between(0.05, 0.3)

    @task
    def chat(self) -> None:
        body = {"model": FUNCTION, "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0}
        t0 = time.perf_counter()
        t_first = None
        tokens = 0
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              headers={"Authorization": f"Bearer {API_KEY}"}, name="chat (headers)") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            for line in resp.iter_lines():
                if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    tokens += 1
                    t_first = t_first or time.perf_counter()
            t_end = time.perf_counter()
            resp.success()
            cold = resp.headers.get("x-ember-cold-start") == "true"
            tier = resp.headers.get("x-ember-load-tier", "?")
        ttft = ((t_first or t_end) - t0) * 1000
        fire = events.request.fire
        fire(request_type="LLM", name="ttft_cold_" + tier if cold else "ttft_warm", response_time=ttft,
             response_length=tokens, exception=None, context={})
        fire(request_type="LLM", name="e2e", response_time=(t_end - t0) * 1000, response_length=tokens,
             exception=None, context={})
        if tokens > 1 and t_first is not None:
            fire(request_type="LLM", name="tpot", response_time=(t_end - t_first) * 1000 / (tokens - 1),
                 response_length=tokens, exception=None, context={})
