"""One replay, in a process of its own (coordinator/replays.py starts it, niced):

    python -m gptswarm.coordinator.replay_job JOB_DIR [COORDINATOR_PID]

JOB_DIR holds job.json (the run, the round, the worker's claims and the parts' sizes), the shards
its leases cut (shard-N.npy), sample.pt
(the positions and values the reducer kept of what the worker sent), record.safetensors (its
record), and ../theta.safetensors (theta_global of the round). Writes result.json: the distance
between what was sent and what the record makes, whether they are bit-equal, and the CPU seconds
it took; or `error`, why the record cannot stand (the worker's fault: the replay fails). The torch
threads are the worker's (the same threads make the same sums, bit for bit), at most MAX_THREADS.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from gptswarm.mingpt_core.data import ShardSet
from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.mingpt_core.trainer import TrainConfig
from gptswarm.rounds.hivemind_ext import CODECS
from gptswarm.rounds.replay import ReplayError, claims_match, distance, parse, rerun

MAX_THREADS = 256


def run(job: Path) -> dict:
    spec = json.loads((job / "job.json").read_text())
    sample = torch.load(job / "sample.pt")
    try:
        tensors, meta = parse((job / "record.safetensors").read_bytes())
    except ReplayError as e:
        return {"error": str(e)}
    torch.set_num_threads(max(1, min(meta["threads"], MAX_THREADS)))  # the worker's, even beyond our CPUs: the
    # kernels split their sums by the thread count, not by the cores
    t0 = time.process_time()
    if meta["round"] != spec["round"]:
        return {"error": f"a record of round {meta['round']}, not of round {spec['round']}"}
    claims = {lease: int(v[0]) for lease, v in spec["claims"].items()}
    why = claims_match(meta, claims, spec["tokens_per_step"])
    if why:
        return {"error": why}
    shard_set = ShardSet([], **spec["shard_set"])
    try:
        tokens = {lease: np.load(job / f"shard-{int(v[1])}.npy") for lease, v in spec["claims"].items()}
    except OSError:
        return {"error": "a claim on a shard the run does not have"}
    theta = load_file(str(job.parent / "theta.safetensors"))
    model = GPT(GPTConfig(**spec["model"]))
    topk = spec["compression"] == "topk"
    try:
        replayed = rerun(tensors, meta, theta, model=model, train=TrainConfig.from_dict(spec["train"]),
                         shard_set=shard_set, tokens=tokens, sparsify_fraction=spec["topk_fraction"] if topk else None,
                         codec=CODECS[spec["compression"]](spec["topk_fraction"])[0], part_sizes=spec["part_sizes"])
    except ReplayError as e:
        return {"error": str(e)}
    mine = replayed[sample["indices"]]
    return {"distance": distance(sample["values"], mine), "equal": bool(torch.equal(sample["values"], mine)),
            "cpu_seconds": round(time.process_time() - t0, 3), "steps": len(meta["steps"])}


def die_with_parent(parent: int) -> None:
    """End this process when the coordinator that started it (pid `parent`) is gone, killed even
    with SIGKILL, and even before this process got here: a job outliving it would train for nothing."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> None:
    if len(sys.argv) > 2:
        die_with_parent(int(sys.argv[2]))
    job = Path(sys.argv[1])
    result = run(job)
    (job / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
