"""Incremental detokenization with stop strings: each token costs a decode of a few tokens,
not of the whole output (which made a request's text O(n^2) in its length).

The window is the usual one: decode ids[prefix:] and ids[prefix:read]; the difference is the
new text, unless it ends in an incomplete UTF-8 sequence (then wait for more tokens). A few
prompt tokens start the window, so a tokenizer that drops a leading space at the start of a
decode does not drop it from the first generated word.
"""

from __future__ import annotations

from typing import Any

CONTEXT_TOKENS = 5


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._before: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take one token; return the text that may be sent now (held back: a possible stop-string
        prefix). Sets `stopped` when a stop string appeared (the text is cut before it)."""
        self.ids.append(token)
        if self._before is None:  # the window's settled text changes only when the window moves
            self._before = self._decode(self.ids[self.prefix:self.read])
        before = self._before
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            self._before = None
            if self._append(now[len(before):]):
                return self.flush()
        safe = len(self.text) - self.hold
        if safe > self.emitted:
            out = self.text[self.emitted:safe]
            self.emitted = safe
            return out
        return ""

    def flush(self) -> str:
        """The rest of the text (at the end of generation), cut before a stop string that the
        incomplete tail completes (then `stopped` is set)."""
        if not self.stopped and self.read < len(self.ids):  # an incomplete tail: decode what there is
            tail = self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
            self.read = len(self.ids)
            self._append(tail)  # the tail is output too: a stop in it ends it
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    def _append(self, new: str) -> bool:
        """Add `new` to the text, cut before the first stop string that now appears (looked for from
        where one could still start); True (and `stopped` set) when one did."""
        start = max(0, len(self.text) - max(0, self.hold))
        self.text += new
        cut = _first_stop(self.text, self.stops, start)
        if cut is None:
            return False
        self.text = self.text[:cut]
        self.stopped = True
        return True


def _first_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
