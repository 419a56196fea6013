"""Per-key limits: requests per minute and tokens per minute, enforced in Redis so that every
gateway counts against the same window.

A window is a Redis hash per key and kind: field = epoch second, value = what was admitted in that
second; the last 60 seconds are summed (a sliding window at one-second resolution). One Lua script
checks both limits and admits (counts) only when both hold, so concurrent gateways never overshoot.
Tokens are charged up front as `max_tokens` + the prompt's characters / 4 (the gateway has no
tokenizer), then corrected with the worker's real usage when the request ends.

A key's limits are fields (`rpm`, `tpm`) of its own API-key hash, so the request path reads the
caller, its limits and the function's spec in one round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import redis

from ember.errors import NotFound, RateLimited
from ember.platform.state import Keys

WINDOW_S = 60

# KEYS: requests window, tokens window. ARGV: unused, rpm, tpm, token cost (0 limit: unlimited).
# Returns {admitted (1/0), retry_after_s, which ("rpm"/"tpm"/""), the second counted in}. The
# clock is Redis's own, so gateways with skewed clocks still share one window.
_ADMIT = """
local now = tonumber(redis.call("TIME")[1])
local limits = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local costs = {1, tonumber(ARGV[4])}
local names = {"rpm", "tpm"}
local oldest = now - 59
local retry, which = 0, ""
for i = 1, 2 do
  if limits[i] > 0 then
    local flat = redis.call("HGETALL", KEYS[i])
    local used, seconds = 0, {}
    for j = 1, #flat, 2 do
      local sec, n = tonumber(flat[j]), tonumber(flat[j + 1])
      if sec < oldest then
        redis.call("HDEL", KEYS[i], flat[j])
      else
        used = used + n
        table.insert(seconds, {sec, n})
      end
    end
    if used + costs[i] > limits[i] then
      -- the earliest second after which enough of the window has expired
      table.sort(seconds, function(a, b) return a[1] < b[1] end)
      local freed, wait = 0, 60
      for _, s in ipairs(seconds) do
        freed = freed + s[2]
        if used - freed + costs[i] <= limits[i] then
          wait = s[1] + 60 - now
          break
        end
      end
      if wait > retry then
        retry, which = wait, names[i]
      end
    end
  end
end
if which ~= "" then
  return {0, tostring(retry), which, now}
end
for i = 1, 2 do
  if limits[i] > 0 then
    redis.call("HINCRBY", KEYS[i], tostring(now), costs[i])
    redis.call("EXPIRE", KEYS[i], 61)
  end
end
return {1, "0", "", now}
"""


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits; 0 means unlimited."""

    rpm: int = 0
    tpm: int = 0


class RateLimiter:
    """Admits invocations of an API key within its per-minute limits (see the module docstring)."""

    def __init__(self, client: redis.Redis, default: KeyLimits, aclient: Any = None) -> None:
        """aclient: a redis.asyncio client for `admit_async`/`settle_async` (the request path)."""
        self.client = client
        self.aclient = aclient
        self.default = default
        self._admit = client.register_script(_ADMIT)
        self._aadmit = aclient.register_script(_ADMIT) if aclient is not None else None

    def limits(self, key_id: str) -> KeyLimits:
        h = self.client.hget(Keys.api_key_ids, key_id)
        return self.limits_of(self.client.hgetall(Keys.api_key(h)) if h else {})

    def limits_of(self, row: dict[str, str]) -> KeyLimits:
        """From a key's API-key hash (absent fields: this gateway's defaults)."""
        return KeyLimits(rpm=int(row.get("rpm", self.default.rpm)), tpm=int(row.get("tpm", self.default.tpm)))

    def set_limits(self, key_id: str, rpm: int | None, tpm: int | None) -> KeyLimits:
        """Written into the key's own hash, only while the key exists (a key revoked meanwhile is
        not brought back as a row without a role)."""
        fields = {k: v for k, v in (("rpm", rpm), ("tpm", tpm)) if v is not None}
        if fields:
            h = self.client.hget(Keys.api_key_ids, key_id)
            row = Keys.api_key(h) if h else ""

            def write(pipe: Any) -> None:
                if not row or not pipe.exists(row):
                    raise NotFound(f"no API key with id {key_id!r}", code="key_not_found")
                pipe.multi()
                pipe.hset(row, mapping=fields)

            self.client.transaction(write, *([row] if row else []))
        return self.limits(key_id)

    def forget(self, key_id: str) -> None:
        """A revoked key's windows (its limits went with its hash)."""
        self.client.delete(Keys.key_limits(key_id), Keys.rate_window(key_id, "rpm"), Keys.rate_window(key_id, "tpm"))

    def adopt_legacy_limits(self) -> int:
        """Limits stored by earlier versions under `ember:limits:<id>` move into the keys' hashes
        (run once at gateway start; idempotent). Returns how many moved."""
        moved = 0
        for legacy in self.client.scan_iter(Keys.key_limits("*")):
            key_id = legacy.rsplit(":", 1)[-1]
            fields = self.client.hgetall(legacy)
            h = self.client.hget(Keys.api_key_ids, key_id)
            if h and fields and self.client.exists(Keys.api_key(h)):
                self.client.hset(Keys.api_key(h), mapping=fields)
                moved += 1
            self.client.delete(legacy)
        return moved

    def admit(self, key_id: str, tokens: int) -> int:
        """Count one request of `tokens` estimated tokens, or raise RateLimited (429, Retry-After).
        Returns the second it was counted in (for `settle`), 0 when the key is unlimited."""
        lim = self.limits(key_id)
        if lim.rpm <= 0 and lim.tpm <= 0:
            return 0
        return self._admitted(lim, tokens, self._admit(keys=self._windows(key_id), args=self._args(lim, tokens)))

    async def admit_async(self, key_id: str, tokens: int, lim: KeyLimits) -> int:
        """`admit` on the event loop, under `lim`: the limits in the caller's API-key hash as the
        request read it (with the function's spec, in one round trip; `limits_of`)."""
        if lim.rpm <= 0 and lim.tpm <= 0:
            return 0
        return self._admitted(lim, tokens, await self._aadmit(keys=self._windows(key_id), args=self._args(lim, tokens)))

    @staticmethod
    def _windows(key_id: str) -> list[str]:
        return [Keys.rate_window(key_id, "rpm"), Keys.rate_window(key_id, "tpm")]

    @staticmethod
    def _args(lim: KeyLimits, tokens: int) -> list[int]:
        return [0, lim.rpm, lim.tpm, max(0, tokens)]

    @staticmethod
    def _admitted(lim: KeyLimits, tokens: int, result: list) -> int:
        ok, retry, which, now = result
        if not int(ok):
            what = f"{lim.rpm} requests" if which == "rpm" else f"{lim.tpm} tokens"
            if which == "tpm" and tokens > lim.tpm:
                raise RateLimited(f"this request's {tokens} tokens exceed the key's limit of {lim.tpm} per minute",
                                  retry_after_s=None, code="tokens_exceed_limit")
            raise RateLimited(f"rate limit of {what} per minute for this API key reached",
                              retry_after_s=max(1.0, float(retry)))
        return int(now)

    def settle(self, key_id: str, second: int, estimated: int, actual: int) -> None:
        """Replace a request's estimated tokens with what it really used (same second bucket)."""
        if second and actual != estimated and self.limits(key_id).tpm > 0:
            key = Keys.rate_window(key_id, "tpm")
            with self.client.pipeline(transaction=True) as p:
                p.hincrby(key, str(second), actual - estimated)
                p.expire(key, 61)
                p.execute()

    async def settle_async(self, key_id: str, second: int, estimated: int, actual: int, limits: KeyLimits) -> None:
        """`settle` on the event loop, under the limits the request was admitted with."""
        if not second or actual == estimated:
            return
        if limits.tpm > 0:
            key = Keys.rate_window(key_id, "tpm")
            async with self.aclient.pipeline(transaction=True) as p:
                p.hincrby(key, str(second), actual - estimated)
                p.expire(key, 61)
                await p.execute()


def estimate_tokens(prompt_chars: int, max_tokens: int) -> int:
    """Tokens charged up front: the prompt at ~4 characters a token, plus every token it may generate."""
    return math.ceil(prompt_chars / 4) + max_tokens
