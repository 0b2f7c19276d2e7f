"""When a volunteer lends the machine: `--schedule` time windows in local time, BOINC-style.

    22:00-07:00                    every night (a window may cross midnight)
    mon-fri 22:00-07:00; sat,sun 00:00-24:00
    mon,wed,fri 19:30-23:00

A window that crosses midnight belongs to the day it starts on: "fri 22:00-07:00" runs from
Friday 22:00 to Saturday 07:00.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from gptswarm.errors import UserError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WINDOW = re.compile(r"^(?:(?P<days>[a-z,\-]+)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})$")


def parse_minutes(hhmm: str, text: str) -> int:
    h, m = map(int, hhmm.split(":"))
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise UserError(f"bad time {hhmm!r} in schedule {text!r} (use HH:MM, 00:00 to 24:00)")
    return h * 60 + m


def parse_days(spec: str, text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in spec.split(","):
        ends = part.split("-")
        if len(ends) > 2 or any(d not in DAYS for d in ends):
            raise UserError(f"bad day {part!r} in schedule {text!r} (use mon..sun, ranges like mon-fri, lists like sat,sun)")
        a, b = DAYS.index(ends[0]), DAYS.index(ends[-1])
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # weekday numbers (Monday = 0) on which the window starts
    start: int  # minutes after midnight
    end: int

    def active(self, dt: datetime) -> bool:
        m = dt.hour * 60 + dt.minute
        if self.start < self.end:
            return dt.weekday() in self.days and self.start <= m < self.end
        # crosses midnight (or start == end: a full 24 hours from start)
        return (dt.weekday() in self.days and m >= self.start) or \
            ((dt.weekday() - 1) % 7 in self.days and m < self.end)


class Schedule:
    def __init__(self, windows: Iterable[Window], text: str = "") -> None:
        self.windows, self.text = tuple(windows), text

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """A Schedule from '22:00-07:00; sat,sun 00:00-24:00' (windows separated by ';')."""
        windows = []
        for part in filter(None, (p.strip().lower() for p in text.split(";"))):
            m = WINDOW.match(part)
            if not m:
                raise UserError(f"bad schedule window {part!r}: expected '[DAYS ]HH:MM-HH:MM', e.g. 'mon-fri 22:00-07:00'")
            days = parse_days(m["days"], text) if m["days"] else frozenset(range(7))
            windows.append(Window(days, parse_minutes(m["start"], text), parse_minutes(m["end"], text)))
        if not windows:
            raise UserError("empty schedule: give at least one window such as 22:00-07:00")
        return cls(windows, text)

    def active(self, dt: datetime | None = None) -> bool:
        dt = dt or datetime.now()
        return any(w.active(dt) for w in self.windows)

    def next_change(self, dt: datetime | None = None) -> datetime | None:
        """The next minute at which active() flips (within a week), or None if it never does."""
        dt = (dt or datetime.now()).replace(second=0, microsecond=0)
        now = self.active(dt)
        for i in range(1, 7 * 24 * 60 + 1):
            t = dt + timedelta(minutes=i)
            if self.active(t) != now:
                return t
        return None

    def reason(self, dt: datetime | None = None) -> str:
        """Why the worker is not training now, or '' when inside a window."""
        if self.active(dt):
            return ""
        nxt = self.next_change(dt)
        return "outside schedule" + (f" (next window {nxt:%a %H:%M})" if nxt else "")
