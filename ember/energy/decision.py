"""What a `PowerLimitController` decides: a device `Setting` (power limit and SM clock locks) and
each `Decision` that moved to one, in which mode and phase, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Mode = Literal["observe", "recommend", "actuate"]
MODES: tuple[Mode, ...] = ("observe", "recommend", "actuate")


@dataclass(frozen=True)
class Setting:
    """A device setting: power limit in watts and SM clock lock in MHz (None: unlocked)."""

    power_limit_w: float
    sm_clock_mhz: float | None
    # the clock prefill runs at: the same lock, or (`phase_clocks`) the one the serving engine
    # switches to while a prefill runs (None: unlocked)
    prefill_sm_clock_mhz: float | None = None


@dataclass(frozen=True)
class Decision:
    """One change (or refusal) the controller made, with why."""

    at_s: float
    device: str
    mode: Mode
    phase: str  # "profiling" | "online"
    setting: Setting
    previous: Setting
    reason: str
    applied: bool

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["setting"] = asdict(self.setting)
        d["previous"] = asdict(self.previous)
        return d
