"""The swarm's status as one JSON-able snapshot: what /api/v1/status returns, what the status page
draws and what /metrics exports. Field names are a stable API (docs/status-api.md). Nothing secret
(tokens, sessions) is ever included. Its size is bounded whatever the swarm's: WORKERS_SHOWN
workers (online ones first) with totals over all of them, the last `history` rounds; the rest is
paged (/api/v1/workers, /api/v1/rounds)."""

import time

from gptswarm.states import RoundState, WorkerState

STALL_SECONDS = 120  # no token trained for this long while workers are online: stalled
RECENT_SECONDS = 300  # failures this recent make the swarm "degraded"
NOT_LEARNING_ROUNDS = 3  # this many rounds in a row that fail or leave out most values: a "warning", the swarm is not learning
NOT_LEARNING_LEFT_OUT = 0.5  # ... "most values": this fraction of the members' values left out by the robust rule
WORKERS_SHOWN = 500  # workers in a snapshot (online ones first); /api/v1/workers pages through all
ENDED_BADLY = (RoundState.FAILED, RoundState.REJECTED)


def worker_rows(coord, now, limit=WORKERS_SHOWN, offset=0):
    out = []
    for w in coord.ledger.workers_for_status(limit, offset):
        online = w["online"]
        state, reason = w["state"] or WorkerState.JOINING, w["reason"] or ""
        if w["quarantine_reason"]:
            state, reason = WorkerState.QUARANTINED, w["quarantine_reason"]
        elif w["left_at"] is not None:
            state, reason = WorkerState.OFFLINE, "left the swarm"
        elif not online:
            state, reason = WorkerState.OFFLINE, f"no heartbeat for {int(now - (w['last_seen'] or now))} s"
        out.append({
            "id": w["id"], "name": w["name"], "state": state, "reason": reason, "device": w["device"] or "",
            "tokens_per_second": round(w["tokens_per_second"] or 0.0, 1) if online else 0.0,
            "tokens_contributed": w["tokens_contributed"] or 0, "tokens_credited": w["tokens_credited"] or 0,
            "tokens_verified": w["tokens_verified"] or 0,
            "score": _round(w["score"]), "standing": _round(w["standing"]), "bytes_sent": w["bytes_sent"] or 0,
            "last_seen": w["last_seen"], "seconds_since_seen": round(now - (w["last_seen"] or now), 1),
            "joined_at": w["joined_at"], "online": online,
            "refused": w["refused"], "last_refusal": w["last_refusal"], "quarantined": bool(w["quarantine_reason"]),
        })
    return out


def _round(x):
    return None if x is None else round(x, 3)


def not_learning(rounds):
    """(how many of the last finished rounds in a row failed or left out most values, why: "" when
    fewer than NOT_LEARNING_ROUNDS did). rounds: the ledger's finished_rounds, oldest first."""
    streak = []
    for r in reversed(rounds):
        if r["state"] not in ENDED_BADLY and (r["left_out"] or 0) < NOT_LEARNING_LEFT_OUT:
            break
        streak.append(r)
    if len(streak) < NOT_LEARNING_ROUNDS:
        return len(streak), ""
    failed = [r for r in streak if r["state"] != RoundState.DONE]
    last = streak[0]
    why = (f"round {last['round']} {last['state']}: {last['detail'] or 'no averaging group'}" if last["state"] != RoundState.DONE
           else f"round {last['round']} left {last['left_out']:.0%} of the members' values out of the average")
    return len(streak), (f"not learning: the last {len(streak)} rounds failed ({len(failed)}) or left most values out "
                         f"of the average ({len(streak) - len(failed)}); {why}")


def health(coord, counts, rounds, now):
    view = coord.round_view()
    if view.finished:
        return "finished", f"the run reached its budget of {coord.settings.max_tokens:,} tokens"
    if not counts["online"]:
        return "stalled", "no worker is online"
    last_progress = max([r["ended_at"] or 0 for r in rounds] + [view.started_at])
    if coord.ledger.round_tokens(view.round) == 0 and now - last_progress > STALL_SECONDS:
        return "stalled", f"no tokens trained for {int(now - last_progress)} s"
    streak, why = not_learning(rounds)
    if why:
        return "warning", why
    recent = now - RECENT_SECONDS
    failed = [r for r in rounds if r["state"] in ENDED_BADLY and (r["ended_at"] or 0) > recent]
    if failed:
        return "degraded", f"round {failed[-1]['round']} {failed[-1]['state']}: {failed[-1]['detail'] or 'no averaging group'}"
    rejected = coord.ledger.count_events("contribution_rejected", since=recent)
    if rejected:
        return "degraded", f"{rejected} contribution(s) rejected in the last {RECENT_SECONDS // 60} minutes"
    refused = coord.ledger.count_events("refused", since=recent)
    if refused:
        return "degraded", f"{refused} refused claim(s) in the last {RECENT_SECONDS // 60} minutes (see the events)"
    expired = coord.ledger.count_events("lease_expired", since=recent)
    if expired:
        return "degraded", f"{expired} lease(s) expired in the last {RECENT_SECONDS // 60} minutes (workers vanished)"
    training = counts["by_state"].get(WorkerState.TRAINING, 0)
    return "healthy", f"{counts['online']} worker(s) online, {training} training"


def snapshot(coord, history=200, events=30, workers=WORKERS_SHOWN):
    now = time.time()
    view = coord.round_view()
    s = coord.settings
    counts = coord.ledger.worker_counts()
    shown = worker_rows(coord, now, limit=workers)
    rounds = coord.ledger.finished_rounds(history)
    state, reason = health(coord, counts, rounds, now)
    tps = counts["tokens_per_second"]
    left = max(0, s.max_tokens - view.tokens_trained)
    shards = coord.ledger.shard_counts()
    evs = coord.ledger.recent_events(events)
    return {
        "generated_at": now,
        "run": {
            "id": s.run_id, "task": s.task.get("task"), "model": s.extra.get("preset"),
            "n_params": coord.n_params, "round": view.round, "phase": view.phase,
            "tokens_trained": view.tokens_trained, "max_tokens": s.max_tokens,
            "tokens_per_round": coord.round_target(), "inner_steps": s.inner_steps, "round_tokens": coord.ledger.round_tokens(view.round),
            "tokens_per_second": round(tps, 1), "eta_seconds": round(left / tps) if tps > 0 else None,
            "compression": s.compression, "theta_hash": view.theta_hash, "val_loss": view.val_loss,
        },
        "health": {"state": state, "reason": reason},
        "workers": shown,
        "worker_counts": counts,
        "reducers": coord.reducer_nodes.snapshot(),  # the operator's reducer nodes (empty: the coordinator reduces)
        "shards": {"epoch": coord.ledger.get_meta("epoch", 0), "total": sum(shards.values()), **shards},
        "rounds": rounds,
        "top_contributors": [{"name": w["name"], "tokens_contributed": w["tokens_contributed"],
                              "tokens_credited": w["tokens_credited"], "tokens_verified": w["tokens_verified"]}
                             for w in coord.ledger.top_contributors(10)],
        "events": [{"at": e["at"], "kind": e["kind"], "worker": e["name"], "detail": e["detail"]} for e in evs],
    }
