"""Replay: a worker's round is deterministic given theta_global, the batches of its leases, and the
state it started from, so the coordinator can re-run a contribution and see whether the worker did
the work it claims (docs/architecture.md "Credit for work done": BTARD's idea).

The worker records each round as it trains it (Recorder, on its round loop): the state its first
step started from (AdamW's moments and step counts, the trainer's step, which sets the learning rate,
and theta itself where the round began with steps trained ahead on the previous theta_local), each
step's lease, the batch generator of each lease at its first step in the round, where theta_global
was put under the steps trained ahead (the rebase, worker/loop.py's carry) and the trainer's step
then, and the top-k residual its contribution was sparsified with. When it takes its pseudo-gradient
it seals the record: one safetensors file, whose sha256 it sends with its final claims (its
commitment, before the round's reduce, before it can know whether it will be replayed). The
coordinator draws a secret random fraction of the round's members, keeps SAMPLE values of each drawn
member's contribution at secret positions as they reach the reducer (Witness), and, once the round
committed, asks them for their records; rerun() trains the round again from the record on the
operator's machine, through the same codec, and compare() measures the distance between what the
worker sent and what its record makes, on the sample.

Equal, bit for bit, on the same device kind with the same number of threads (tests/test_replay.py); a
different thread count or device changes the order of floating-point sums, hence TOLERANCE
(bench/README.md "Credit for work done" has the measured distances). A record proves that the
contribution follows from the state the worker committed to; it does not prove that state was
earned (AdamW moments made up to take small steps replay faithfully): scoring sees what such a
contribution does to the loss.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hivemind.compression import CompressionInfo
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from gptswarm.mingpt_core.data import Batches, Shard
from gptswarm.mingpt_core.model import GPT
from gptswarm.mingpt_core.optim8bit import BLOCK
from gptswarm.mingpt_core.trainer import DTYPES, OPTIMIZERS, TrainConfig, Trainer
from gptswarm.rounds.codecs import decode, sparsify
from gptswarm.rounds.outer import pseudo_gradient
from gptswarm.rounds.theta import theta_views

VERSION = 1
SAMPLE = 4096  # values of a drawn member's contribution kept to compare with its replay
TOLERANCE = 0.02  # a replay passes within this relative distance (L2, on the sample) of what was sent
MAX_STEPS = 1 << 20  # steps one record may hold
KEEP = 2  # sealed records a worker keeps (round r's is asked for once r commits, before r + 2 is sealed)


class ReplayError(ValueError):
    """A record that cannot be replayed as it stands (it is the worker's word, checked)."""


def commitment(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class Recorder:
    """A worker's record of the round it is training. start() when the model holds theta_global (or,
    base given, the theta_local the steps trained ahead start from), step() before each training
    step, rebase() where theta_global is put under the steps trained ahead, seal() when the
    pseudo-gradient is taken; sealed records are kept in `directory`, the newest KEEP.

    Threads: the round loop alone (seal() runs in Exchanger.begin, on the round loop)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] | None = None

    def start(self, trainer: Trainer, base: Mapping[str, torch.Tensor] | None = None) -> None:
        t: dict[str, torch.Tensor] = {}
        for i, st in trainer.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    t[f"optim.{i}.{k}"] = v.detach().to("cpu", copy=True)
        for name, v in (base or {}).items():
            t[f"theta.{name}"] = v.detach().to("cpu", copy=True)
        self.tensors = t
        self.meta = {"start_step": trainer.step, "leases": [], "steps": [], "rebase_at": None if base else 0,
                     "rebase_step": trainer.step}

    def step(self, lease_id: str, batches: Any) -> None:
        m = self.meta
        if m is None:
            return
        if lease_id not in m["leases"]:
            m["leases"].append(lease_id)
            self.tensors[f"gen.{len(m['leases']) - 1}"] = batches.generator.get_state()
        m["steps"].append(m["leases"].index(lease_id))

    def rebase(self, trainer_step: int) -> None:
        if self.meta is not None and self.meta["rebase_at"] is None:
            self.meta["rebase_at"], self.meta["rebase_step"] = len(self.meta["steps"]), trainer_step

    def seal(self, round_: int, trainer: Trainer, residual: Mapping[str, torch.Tensor] | None) -> str:
        """Round round_'s record to its file; its commitment (sha256), "" if there is no record."""
        m = self.meta
        if m is None or m["rebase_at"] is None:
            return ""
        tensors = dict(self.tensors)
        for name, v in (residual or {}).items():
            tensors[f"residual.{name}"] = v.detach().to("cpu", torch.float32).contiguous()
        meta = dict(m, version=VERSION, round=round_, micro_batch=trainer.cfg.micro_batch_size,
                    dtype=str(trainer.dtype).removeprefix("torch."), threads=torch.get_num_threads(),
                    device=trainer.device.type, optimizer=trainer.cfg.optimizer,
                    checkpointing=bool(trainer.cfg.checkpointing))
        blob = save_tensors(tensors, metadata={"replay": json.dumps(meta)})
        path = self.path(round_)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        for old in sorted(self.directory.glob("round-*.safetensors"))[:-KEEP]:
            old.unlink(missing_ok=True)
        self.meta = None  # the next round's record starts at its own start()
        return commitment(blob)

    def path(self, round_: int) -> Path:
        return record_path(self.directory, round_)


def record_path(directory: Path, round_: int) -> Path:
    """Where a worker keeps its sealed record of round_."""
    return Path(directory) / f"round-{round_:06d}.safetensors"


def parse(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A record's tensors and meta; ReplayError if it is not one."""
    try:
        tensors = load_tensors(blob)
        size = int.from_bytes(blob[:8], "little")  # safetensors: the header's length, then the header
        meta = json.loads(json.loads(blob[8:8 + size])["__metadata__"]["replay"])
    except Exception as e:  # noqa: BLE001 (any malformed file is the worker's)
        raise ReplayError(f"not a replay record: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        raise ReplayError(f"not a version {VERSION} replay record")
    ints = ("round", "start_step", "rebase_at", "rebase_step", "micro_batch", "threads")
    if any(not isinstance(meta.get(k), int) or meta[k] < 0 for k in ints):
        raise ReplayError(f"a record whose {', '.join(ints)} are not all counts")
    steps, leases = meta.get("steps"), meta.get("leases")
    if not (isinstance(steps, list) and isinstance(leases, list) and len(steps) <= MAX_STEPS
            and all(isinstance(x, str) for x in leases) and len(set(leases)) == len(leases)
            and all(isinstance(i, int) and 0 <= i < len(leases) for i in steps)):
        raise ReplayError("a record whose steps do not name its leases")
    if not meta["rebase_at"] <= len(steps) or meta.get("dtype") not in DTYPES:
        raise ReplayError("a record with a rebase beyond its steps or an unknown dtype")
    if meta.get("optimizer") not in OPTIMIZERS or not isinstance(meta.get("checkpointing"), bool):
        raise ReplayError("a record with an unknown optimizer")
    return tensors, meta


def claims_match(meta: Mapping[str, Any], claims: Mapping[str, int], tokens_per_step: int) -> str:
    """Why a record's steps do not account for the claims the ledger credited (lease id -> tokens);
    "" if they do: every step on a lease of those claims, each claim covered by its steps."""
    count = Counter(meta["leases"][i] for i in meta["steps"])
    stray = [lease for lease in count if lease not in claims]
    if stray:
        return f"its record trains on {len(stray)} lease(s) it claimed nothing on in the round"
    short = {lease: t for lease, t in claims.items() if count.get(lease, 0) * tokens_per_step < t}
    if short:
        lease, t = next(iter(short.items()))
        return (f"its record trains {count.get(lease, 0) * tokens_per_step} tokens on lease {lease[:12]}, "
                f"which it claimed {t} on")
    return ""


def rerun(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], theta_global: Mapping[str, torch.Tensor], *,
          model: GPT, train: TrainConfig, shard_set: Any, tokens: Mapping[str, Any], sparsify_fraction: float | None,
          codec: Any, part_sizes: list[int]) -> torch.Tensor:
    """The contribution the record makes, flat in theta's name order, through the run's codec part by
    part as the reducer receives it. model: a fresh GPT of the run's config (its weights are set
    here); train: the run's TrainConfig; tokens: {lease id: the leased shard's tokens};
    sparsify_fraction: a top-k run's fraction (None otherwise); codec: the contributions' hivemind
    codec (rounds/hivemind_ext.CODECS); part_sizes: the parts' values, in the order the reducer
    received them. ReplayError where the record does not fit the run."""
    params = theta_views(model)
    names = list(params)  # the order the contributions' parts come in (theta_global's may be another: a file's)
    if set(names) != set(theta_global):
        raise ReplayError("theta_global does not hold the model's tensors")
    carried = meta["rebase_at"] > 0  # the round began with steps trained ahead from the record's own theta
    base: dict[str, torch.Tensor] = {}
    for n in names:
        b = tensors.get(f"theta.{n}") if carried else theta_global[n]
        if b is None or b.shape != params[n].shape or b.dtype != params[n].dtype:
            raise ReplayError(f"a record whose theta {n} does not fit the model")
        base[n] = b
        with torch.no_grad():
            params[n].copy_(b)
    cfg = TrainConfig.from_dict(dict(train.to_dict(), dtype=meta["dtype"], micro_batch_size=meta["micro_batch"],
                                     optimizer=meta["optimizer"], checkpointing=meta["checkpointing"]))
    trainer = Trainer(model, cfg, device="cpu")
    _load_optimizer(trainer, tensors)
    trainer.step = meta["start_step"]
    batches = {}
    for i, lease in enumerate(meta["leases"]):
        if lease not in tokens:
            raise ReplayError(f"a record that trains on lease {lease[:12]}, which is not the worker's in the round")
        drawn = Batches([Shard(tokens[lease], "train")], shard_set, model.config.block_size, train.batch_size)
        try:
            drawn.generator.set_state(tensors[f"gen.{i}"])
        except Exception:  # noqa: BLE001 (the worker's bytes)
            raise ReplayError(f"a record whose batch generator of lease {lease[:12]} is not one") from None
        batches[i] = drawn
    steps = meta["steps"]
    for k in range(len(steps) + 1):
        if k == meta["rebase_at"] and carried:  # theta_global under what was trained ahead (worker/sync.into_model)
            with torch.no_grad():
                for n in names:
                    params[n].add_(theta_global[n] - base[n])
            trainer.step = meta["rebase_step"]
        if k < len(steps):
            trainer.train_step(*batches[steps[k]].next())
    grad = pseudo_gradient({n: theta_global[n] for n in names}, params)
    if sparsify_fraction is not None:
        grad = {n: sparsify(g, _residual(tensors, n, g), sparsify_fraction)[0] for n, g in grad.items()}
    flat = torch.cat([grad[n].reshape(-1) for n in names])
    if sum(part_sizes) != flat.numel():
        raise ReplayError(f"the round's parts hold {sum(part_sizes)} values, the model {flat.numel()}")
    return torch.cat([decode(codec.compress(p, CompressionInfo.from_tensor(p)), p.numel()).reshape(-1)
                      for p in flat.split(part_sizes)])


def _residual(tensors: Mapping[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor | None:
    r = tensors.get(f"residual.{name}")
    if r is not None and (r.shape != like.shape or r.dtype != torch.float32):
        raise ReplayError(f"a record whose top-k residual {name} does not fit the model")
    return r


def _load_optimizer(trainer: Trainer, tensors: Mapping[str, torch.Tensor]) -> None:
    """The record's optimizer state into the trainer's optimizer (AdamW's or AdamW8bit's), every tensor
    checked against the shape and dtype that optimizer keeps for that parameter."""
    sd = trainer.optimizer.state_dict()
    shapes = [p.shape for g in trainer.optimizer.param_groups for p in g["params"]]
    coded = trainer.cfg.optimizer == "adamw8bit"
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, i, k = name.split(".", 2)
            if not i.isdigit() or int(i) >= len(shapes) or not _fits(k, v, shapes[int(i)], coded):
                raise ReplayError(f"a record whose optimizer state {name} does not fit the model")
            state.setdefault(int(i), {})[k] = v
    if any(set(s) not in ({"step", "exp_avg", "exp_avg_sq"}, set(CODED)) for s in state.values()):
        raise ReplayError("a record with a partial optimizer state")
    trainer.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


CODED = ("step", "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")  # AdamW8bit's


def _fits(key: str, v: torch.Tensor, shape: torch.Size, coded: bool) -> bool:
    """Is v what the optimizer (AdamW8bit if coded, else AdamW) keeps as `key` for a parameter of `shape`?"""
    n = shape.numel()
    blocks = -(-n // BLOCK)
    if key == "step":
        return v.numel() == 1 and v.dtype.is_floating_point
    if key in ("exp_avg", "exp_avg_sq"):  # AdamW8bit keeps a small parameter's moments flat, in fp32
        return v.dtype.is_floating_point and (v.shape == (n,) and v.dtype == torch.float32 if coded else v.shape == shape)
    if not coded:
        return False
    if key in ("exp_avg_codes", "exp_avg_sq_codes"):
        return v.shape == (blocks, BLOCK) and v.dtype == torch.uint8
    if key in ("exp_avg_scales", "exp_avg_sq_scales"):
        return v.shape == (blocks,) and v.dtype == torch.float32
    return False


def distance(sent: torch.Tensor, replayed: torch.Tensor) -> float:
    """|sent - replayed| / |replayed| on the sample (inf where the replay is zero and what was sent is not)."""
    diff = float(torch.linalg.vector_norm(sent.float() - replayed.float()))
    ref = float(torch.linalg.vector_norm(replayed.float()))
    return diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))


class Witness:
    """What the reducer keeps of the drawn members' contributions: SAMPLE values at secret positions.
    Threads: built by the round loop; the reducer's event loop alone calls bind/take during the
    reduce; the round loop reads `values` and `part_sizes` once reduce() has returned."""

    def __init__(self, drawn: set[str], total: int, sample: int = SAMPLE) -> None:
        self.drawn = drawn
        g = torch.Generator().manual_seed(secrets.randbits(62))  # the positions: secret to the coordinator
        # sorted distinct positions (a draw with replacement, its repeats dropped: no permutation of a model's size)
        drawn_at = torch.randint(total, (sample,), generator=g) if total else torch.zeros(0, dtype=torch.long)
        self.indices = torch.unique(drawn_at)
        self.values: dict[str, torch.Tensor] = {}
        self.part_sizes: list[int] = []
        self.keys: list[str | None] = []
        self._offsets: list[int] = [0]

    def bind(self, keys: list[str | None], part_sizes: list[int]) -> None:
        self.keys, self.part_sizes = list(keys), list(part_sizes)
        for n in part_sizes:
            self._offsets.append(self._offsets[-1] + n)
        self.values = {k: torch.full((len(self.indices),), float("nan")) for k in self.keys if k in self.drawn}

    def take(self, sender: int, part_index: int, part: torch.Tensor) -> None:
        key = self.keys[sender] if 0 <= sender < len(self.keys) else None
        if key is None or key not in self.values:
            return
        a, b = self._offsets[part_index], self._offsets[part_index + 1]
        lo, hi = torch.searchsorted(self.indices, torch.tensor([a, b])).tolist()
        if hi > lo:
            self.values[key][lo:hi] = part.reshape(-1).float()[self.indices[lo:hi] - a]

    def sample(self, key: str) -> torch.Tensor | None:
        """The drawn member's kept values, None unless every one of its parts arrived."""
        v = self.values.get(key)
        return None if v is None or bool(torch.isnan(v).any()) else v


class Taps:
    """Several of the reducer's taps (scoring's Probe, a Witness) as one: bind and take go to each."""

    def __init__(self, *taps: Any) -> None:
        self.taps = [t for t in taps if t is not None]

    def bind(self, keys: list[str | None], part_sizes: list[int]) -> None:
        for t in self.taps:
            t.bind(keys, part_sizes)

    def take(self, sender: int, part_index: int, part: torch.Tensor) -> None:
        for t in self.taps:
            t.take(sender, part_index, part)
