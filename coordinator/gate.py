"""The safety gate: a committed round's new theta is evaluated on the validation shards off the
round's critical path, and a round whose loss jumps is taken back after the fact (the run goes back
to the theta it started from, kept: the last 3 rounds always are; workers follow through the hash
check, as after an operator's rollback). The first half of the gate, a non-finite theta, is the
round's commit itself (rounds.py)."""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptswarm.mingpt_core.data import eval_batches
from gptswarm.mingpt_core.model import GPT
from gptswarm.mingpt_core.trainer import evaluate_loss
from gptswarm.rounds.theta import round_dir, set_checkpoint_meta

if TYPE_CHECKING:
    from gptswarm.coordinator.ledger import Ledger

log = logging.getLogger("gptswarm.coordinator")
# the gate compares a round's validation loss with the median of the last VAL_LOSS_WINDOW evaluated
# rounds, the rejected ones included: a one-off jump is refused, but a level that honest training keeps
# for three rounds in a row becomes the baseline. (Against the best of the committed rounds only, a run
# near zero loss at a constant learning rate was refused round after round, for ever: seen at round 773
# of a long run on the addition task, with honest jumps from 0.0001 to 0.15-0.26.)
VAL_LOSS_WINDOW = 5
VAL_LOSS_SLACK = 0.1  # plus this much (measured in clean runs: +15% between two rounds at a loss of 1.5; from
#                       0.0001 to 0.006 near zero, where relative changes mean nothing)


class RoundRejected(Exception):
    """The round's new theta fails the safety gate."""


class Background:
    """Runs fn(*args) in a thread of its own for the newest of the calls submitted: one submitted
    while another runs waits, and replaces any that was waiting (an older round's evaluation is
    not worth delaying the newest one for).

    Threads: submit/wait/close (any thread) and the worker thread share waiting, busy, closed and
    thread, all under self.cond."""

    def __init__(self, fn: Callable[..., None], name: str):
        self.fn, self.name = fn, name
        self.cond = threading.Condition()
        self.waiting: tuple | None = None
        self.busy = self.closed = False
        self.thread: threading.Thread | None = None

    def submit(self, *args: Any) -> None:
        with self.cond:
            self.waiting = args
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.waiting is None and not self.closed:
                    self.cond.wait()
                if self.waiting is None:
                    return
                args, self.waiting, self.busy = self.waiting, None, True
            try:
                self.fn(*args)
            except Exception:
                log.exception("%s failed", self.name)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing runs or waits; False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: self.waiting is None and not self.busy, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then stop."""
        self.wait(timeout)
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class SafetyGate:
    """Evaluates committed rounds on its own thread (Background) and takes a bad one back.
    max_rise: the --max-val-loss-rise fraction; eval_tokens: validation tokens per evaluation;
    on_val_loss(loss): hears of each round that passed (the round keeper keeps the newest).
    It writes only the ledger (its own transactions) and the round's checkpoint meta."""

    def __init__(self, *, state_dir: Path, ledger: Ledger, val_shards: list, shard_set: Any, max_rise: float,
                 eval_tokens: int, on_val_loss: Callable[[float], None]):
        self.state_dir, self.ledger, self.val_shards, self.shard_set = state_dir, ledger, val_shards, shard_set
        self.max_rise, self.eval_tokens, self.on_val_loss = max_rise, eval_tokens, on_val_loss
        self.evaluations = Background(self._evaluated, name="evaluation")

    def submit(self, r: int, model: GPT) -> None:
        """Evaluate round r's new theta (a copy of the model nobody else holds), soon."""
        self.evaluations.submit(r, model)

    def wait(self, timeout: float | None = None) -> bool:
        return self.evaluations.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        self.evaluations.close(timeout)

    def _evaluated(self, r: int, model: GPT) -> None:
        t0 = time.time()
        val_loss = self.evaluate(model)
        seconds = time.time() - t0
        try:
            self.check(val_loss)
        except RoundRejected as e:
            self.ledger.reject_late(r, str(e), val_loss)
            if round_dir(self.state_dir, r).is_dir():
                self.ledger.request_rollback(r)
            log.warning("round %d rejected after its evaluation: %s; going back to its starting theta", r, e)
            return
        self.ledger.set_val_loss(r, val_loss)
        set_checkpoint_meta(self.state_dir, r + 1, val_loss=val_loss)
        self.on_val_loss(val_loss)
        log.info("round %d: validation loss %.4f (%.2f s)", r, val_loss, seconds,
                 extra={"fields": {"event": "evaluation", "round": r, "seconds": round(seconds, 4)}})

    def check(self, val_loss: float) -> None:
        """Raise RoundRejected if a round's theta evaluates much worse than the recent ones."""
        if not math.isfinite(val_loss):
            raise RoundRejected(f"validation loss {val_loss}")
        recent = self.ledger.recent_val_losses(VAL_LOSS_WINDOW)
        if recent:
            typical = statistics.median(recent)
            if val_loss > typical * (1 + self.max_rise) + VAL_LOSS_SLACK:
                raise RoundRejected(f"validation loss {val_loss:.4f} is more than {self.max_rise:.0%} "
                                    f"(+{VAL_LOSS_SLACK}) above the median of the last {len(recent)} evaluated "
                                    f"rounds ({typical:.4f})")

    def evaluate(self, model: GPT) -> float:
        """The validation loss of `model` on the run's validation shards."""
        batches = eval_batches(self.val_shards, self.shard_set, model.config.block_size, 64, self.eval_tokens)
        return round(evaluate_loss(model, batches), 4)
