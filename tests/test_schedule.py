from datetime import datetime

import pytest

from gptswarm.errors import UserError
from gptswarm.worker.schedule import Schedule

MON = datetime(2026, 11, 23)  # a Monday


def at(day, hhmm):
    h, m = map(int, hhmm.split(":"))
    return MON.replace(day=MON.day + day, hour=h, minute=m)


def test_window_across_midnight():
    s = Schedule.parse("22:00-07:00")
    assert s.active(at(0, "23:30")) and s.active(at(1, "00:00")) and s.active(at(1, "06:59"))
    assert not s.active(at(1, "07:00")) and not s.active(at(0, "21:59")) and not s.active(at(0, "12:00"))
    assert s.next_change(at(0, "12:00")) == at(0, "22:00")
    assert s.reason(at(0, "12:00")) == "outside schedule (next window Mon 22:00)"
    assert s.reason(at(0, "23:00")) == ""


def test_weekday_masks():
    s = Schedule.parse("mon-fri 22:00-07:00; sat,sun 00:00-24:00")
    assert s.active(at(4, "23:00"))  # Friday night
    assert s.active(at(5, "03:00"))  # Saturday early: Friday's window, and Saturday's whole day
    assert s.active(at(5, "15:00")) and s.active(at(6, "15:00"))  # weekend days
    assert not s.active(at(0, "15:00"))  # Monday afternoon
    assert not s.active(at(0, "03:00"))  # Sunday's window ended at 24:00; no overnight window starts on Sunday
    sun_night = Schedule.parse("mon-fri 22:00-07:00")
    assert not sun_night.active(at(0, "03:00"))  # Sunday is not in the mask, so Monday early is free
    assert sun_night.active(at(1, "03:00"))  # Monday's window runs into Tuesday


def test_day_ranges_wrap_and_lists():
    s = Schedule.parse("fri-mon 10:00-12:00")
    assert {d for d in range(7) if s.active(at(d, "11:00"))} == {0, 4, 5, 6}
    assert Schedule.parse("mon,wed 09:00-10:00").active(at(2, "09:30"))


@pytest.mark.parametrize("bad", ["", "22-07", "25:00-07:00", "someday 10:00-11:00", "10:00-11:61", "mon-xyz 1:00-2:00"])
def test_bad_schedules(bad):
    with pytest.raises(UserError):
        Schedule.parse(bad)
