"""Energy monitor: measurement windows per device and per-request energy attribution.

Windows work like Zeus's `begin_window`/`end_window`: energy and time between two marks, read
from the device's energy counter. Attribution splits the energy a device drew since the last
`attribute()` across the requests it finished in that interval, by share of busy time when every
request reports it, else by share of tokens; energy with no request to carry it (an idle GPU)
is booked to the IDLE pseudo-function.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ember.energy.device import Device
from ember.errors import NotFound

IDLE = "(idle)"


@dataclass(frozen=True)
class Measurement:
    """Energy and time of one window on one device."""

    device_id: str
    start_s: float
    end_s: float
    energy_j: float

    @property
    def time_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def avg_power_w(self) -> float:
        return self.energy_j / self.time_s if self.time_s > 0 else 0.0


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, as the serving layer reports it (latencies in seconds)."""

    function: str
    device_id: str
    tokens: int
    ttft_s: float
    tpot_s: float
    ttft_slo_s: float
    tpot_slo_s: float
    eta: float = 0.5  # Zeus cost knob: 0 = only time matters, 1 = only energy matters
    busy_s: float | None = None  # GPU time the request held, when the runtime knows it

    @property
    def meets_slo(self) -> bool:
        return self.ttft_s <= self.ttft_slo_s and self.tpot_s <= self.tpot_slo_s


@dataclass(frozen=True)
class Attribution:
    """Energy attributed to one request."""

    record: RequestRecord
    energy_j: float


@dataclass
class FunctionEnergy:
    """Running totals for one function."""

    energy_j: float = 0.0
    tokens: int = 0
    requests: int = 0

    @property
    def j_per_token(self) -> float | None:
        return self.energy_j / self.tokens if self.tokens else None


@dataclass
class _DeviceBook:
    device: Device
    mark_j: float
    pending: list[RequestRecord] = field(default_factory=list)
    energy_j: float = 0.0  # attributed since the monitor started
    tokens: int = 0


class EnergyMonitor:
    """Windows and attribution over a fixed set of devices."""

    def __init__(self, devices: Sequence[Device]) -> None:
        self._books = {d.device_id: _DeviceBook(d, d.energy_j()) for d in devices}
        self._windows: dict[str, dict[str, tuple[float, float]]] = {}
        self.functions: dict[str, FunctionEnergy] = {}

    @property
    def devices(self) -> list[Device]:
        return [b.device for b in self._books.values()]

    def device(self, device_id: str) -> Device:
        try:
            return self._books[device_id].device
        except KeyError as e:
            raise NotFound(f"no device {device_id!r} on this node") from e

    # --- windows ---
    def begin_window(self, name: str, device_ids: Iterable[str] | None = None) -> None:
        """Start measuring window `name` on the given devices (all by default)."""
        ids = list(self._books) if device_ids is None else list(device_ids)
        marks = {}
        for device_id in ids:
            dev = self.device(device_id)
            marks[device_id] = (dev.now_s(), dev.energy_j())
        self._windows[name] = marks

    def end_window(self, name: str) -> dict[str, Measurement]:
        """End window `name`: one Measurement per device it covered."""
        try:
            marks = self._windows.pop(name)
        except KeyError as e:
            raise NotFound(f"no measurement window {name!r} was begun") from e
        out = {}
        for device_id, (t0, e0) in marks.items():
            dev = self.device(device_id)
            out[device_id] = Measurement(device_id, t0, dev.now_s(), dev.energy_j() - e0)
        return out

    # --- attribution ---
    def record_request(self, record: RequestRecord) -> None:
        """Queue a finished request for attribution at the next `attribute()`."""
        self._books[self.device(record.device_id).device_id].pending.append(record)

    def attribute(self) -> list[Attribution]:
        """Split each device's energy since the last call over the requests it finished since."""
        out: list[Attribution] = []
        for book in self._books.values():
            now_j = book.device.energy_j()
            delta_j = max(0.0, now_j - book.mark_j)
            book.mark_j = now_j
            book.energy_j += delta_j
            pending, book.pending = book.pending, []
            if not pending:
                self._book(IDLE, delta_j, 0, 0)
                continue
            if all(r.busy_s is not None and r.busy_s > 0 for r in pending):
                weights = [float(r.busy_s or 0.0) for r in pending]
            else:
                weights = [float(max(r.tokens, 0)) for r in pending]
            total = sum(weights)
            for record, weight in zip(pending, weights, strict=True):
                share = weight / total if total > 0 else 1.0 / len(pending)
                out.append(Attribution(record, delta_j * share))
                self._book(record.function, delta_j * share, record.tokens, 1)
            book.tokens += sum(r.tokens for r in pending)
        return out

    def device_j_per_token(self, device_id: str) -> float | None:
        """Energy per token a device has drawn since the monitor started (None before any token)."""
        book = self._books[self.device(device_id).device_id]
        return book.energy_j / book.tokens if book.tokens else None

    def _book(self, function: str, energy_j: float, tokens: int, requests: int) -> None:
        totals = self.functions.setdefault(function, FunctionEnergy())
        totals.energy_j += energy_j
        totals.tokens += tokens
        totals.requests += requests
