"""Prometheus exposition of the swarm (prometheus-client), computed from the ledger at scrape time."""

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gptswarm.coordinator.status import (
    NOT_LEARNING_ROUNDS,
    not_learning,
    snapshot,
    worker_rows,
)
from gptswarm.states import (
    ReducerState,
    ReplayState,
    RoundState,
    ShardState,
    WorkerState,
)

HEALTH_STATES = ("healthy", "degraded", "warning", "stalled", "finished")


class SwarmCollector:
    def __init__(self, coord):
        self.coord = coord

    def collect(self):
        c = self.coord
        snap = snapshot(c, history=NOT_LEARNING_ROUNDS, events=0, workers=0)  # enough rounds for the health
        run = snap["run"]
        ledger = c.ledger

        def gauge(name, doc, value, labels=None):
            g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
            g.add_metric(list((labels or {}).values()), value)
            return g

        yield CounterMetricFamily("gptswarm_tokens_trained", "Tokens averaged into the model", value=run["tokens_trained"])
        yield gauge("gptswarm_token_budget", "The run's token budget", run["max_tokens"])
        yield gauge("gptswarm_round", "Current round", run["round"])
        yield gauge("gptswarm_swarm_tokens_per_second", "Sum of online workers' training throughput",
                    run["tokens_per_second"])
        last = snap["rounds"][-1] if snap["rounds"] else {}
        if last.get("loss") is not None:
            yield gauge("gptswarm_loss", "Mean training loss reported in the last finished round", last["loss"])
        if run["val_loss"] is not None:
            yield gauge("gptswarm_val_loss", "Validation loss of theta_global after the last round", run["val_loss"])
        recent = ledger.finished_rounds(100)
        yield gauge("gptswarm_rounds_not_learning", "Finished rounds in a row that failed or left most of the members' "
                    "values out of the average (3 or more: health is a warning)", not_learning(recent)[0])
        if recent and recent[-1]["left_out"] is not None:
            yield gauge("gptswarm_round_left_out_fraction", "Fraction of the members' values the robust rule left out "
                        "of the last finished round's average", recent[-1]["left_out"])
        rounds = CounterMetricFamily("gptswarm_rounds", "Finished rounds by outcome", labels=["outcome"])
        counts = ledger.round_counts()
        for outcome in (RoundState.DONE, RoundState.FAILED, RoundState.REJECTED):
            rounds.add_metric([outcome], counts.get(outcome, 0))
        yield rounds
        totals = ledger.averaging_totals()
        sent = CounterMetricFamily("gptswarm_averaging_bytes_sent", "Bytes sent for averaging", labels=["peer"])
        sent.add_metric(["coordinator"], totals["coordinator_bytes"])
        sent.add_metric(["workers"], totals["worker_bytes"])
        yield sent
        yield CounterMetricFamily("gptswarm_averaging_seconds", "Seconds the coordinator spent averaging",
                                  value=totals["seconds"])
        for kind, name, doc in (("lease_expired", "gptswarm_leases_expired", "Leases that expired"),
                                ("contribution_rejected", "gptswarm_contributions_rejected", "Rejected contributions"),
                                ("join", "gptswarm_worker_joins", "Workers that joined")):
            yield CounterMetricFamily(name, doc, value=ledger.count_events(kind))
        refused = CounterMetricFamily("gptswarm_refused_claims", "Claims the coordinator refused or clamped, by kind "
                                      "(tokens_clamped, lease_cap, averaging_refused, ...)", labels=["kind"])
        for kind, n in sorted(ledger.refusal_counts().items()):
            refused.add_metric([kind], n)
        yield refused
        workers = GaugeMetricFamily("gptswarm_workers", "Workers by state", labels=["state"])
        by_state = snap["worker_counts"]["by_state"]
        for state in WorkerState:
            workers.add_metric([state], by_state.get(state, 0))
        yield workers
        service = c.service
        if service is not None:
            yield CounterMetricFamily("gptswarm_joins_rate_limited", "Joins refused by the per-network rate limit",
                                      value=service.joins.refused)
            yield gauge("gptswarm_downloads_open", "Shard and checkpoint downloads being served",
                        service.streams.count())
            yield CounterMetricFamily("gptswarm_downloads_stalled", "Downloads cancelled because their client "
                                      "stopped reading", value=service.streams.cancelled_count())
        nodes = GaugeMetricFamily("gptswarm_reducer_nodes", "The operator's reducer nodes by state", labels=["state"])
        reduced = CounterMetricFamily("gptswarm_reducer_rounds", "Rounds each reducer node reduced", labels=["reducer"])
        for state in ReducerState:
            nodes.add_metric([state], sum(r["state"] == state for r in snap["reducers"]))
        for r in snap["reducers"]:
            reduced.add_metric([r["name"]], r["rounds"])
        yield nodes
        yield reduced
        standing = GaugeMetricFamily("gptswarm_worker_standing", "Each scored online worker's standing: the mean of "
                                     "its last scores, its loss decrease per claimed token over the median member's "
                                     "(below 0.25: flagged)", labels=["worker"])
        score = GaugeMetricFamily("gptswarm_worker_score", "Each scored online worker's last round's score (see "
                                  "gptswarm_worker_standing)", labels=["worker"])
        credited = CounterMetricFamily("gptswarm_worker_tokens_credited", "Tokens each online worker's scores "
                                       "credited", labels=["worker"])
        verified = CounterMetricFamily("gptswarm_worker_tokens_verified", "Of each online worker's credited tokens, "
                                       "those of rounds a replay verified", labels=["worker"])
        for w in worker_rows(c, time.time()):  # online ones first, at most status.WORKERS_SHOWN
            if w["online"] and w["standing"] is not None:
                standing.add_metric([w["name"]], w["standing"])
            if w["online"] and w["score"] is not None:
                score.add_metric([w["name"]], w["score"])
            if w["online"]:
                credited.add_metric([w["name"]], w["tokens_credited"])
                verified.add_metric([w["name"]], w["tokens_verified"])
        yield standing
        yield score
        yield credited
        yield verified
        replays = CounterMetricFamily("gptswarm_replays", "Contributions drawn for a replay, by outcome (requested "
                                      "and uploaded: under way; passed; failed: the worker is quarantined; unanswered; "
                                      "lost: the coordinator's own failure)", labels=["outcome"])
        counts = ledger.replay_counts()
        for outcome in ReplayState:
            replays.add_metric([outcome], counts.get(outcome, 0))
        yield replays
        if c.replays is not None:
            yield CounterMetricFamily("gptswarm_replays_skipped", "Rounds whose drawn members were not replayed: "
                                      "too many rounds had replays open", value=c.replays.skipped_rounds())
        shards = GaugeMetricFamily("gptswarm_shards", "Shards of the current epoch by state", labels=["state"])
        for state in ShardState:
            shards.add_metric([state], snap["shards"][state])
        yield shards
        yield gauge("gptswarm_epoch", "Current data epoch", snap["shards"]["epoch"])
        health = GaugeMetricFamily("gptswarm_health", "1 for the swarm's current health state", labels=["state"])
        for state in HEALTH_STATES:
            health.add_metric([state], int(snap["health"]["state"] == state))
        yield health


def registry(coord):
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SwarmCollector(coord))
    return reg


def exposition(reg):
    return generate_latest(reg)
