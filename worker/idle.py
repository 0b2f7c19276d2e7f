"""`--idle-only`: train only while nobody else uses the machine (BOINC's "run only when idle").

On a GPU the question goes to NVML (nvidia-ml-py): which other processes hold a context on our
GPU. On a CPU-only machine: how much CPU other processes use (psutil). Both sit behind the small
probe interface below, the hardware boundary that tests replace. Busy takes effect at once; idle
only after the machine has been quiet for `quiet_seconds`, so training does not flap.
"""

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    import torch


class NvmlProbe:
    """Other processes using GPU `index`, from NVML: [(pid, name)]."""

    def __init__(self, index: int = 0) -> None:
        import pynvml  # nvidia-ml-py; only needed on NVIDIA machines

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def others(self) -> list[tuple[int, str]]:
        mine = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
        procs = []
        for fn in (self.nvml.nvmlDeviceGetComputeRunningProcesses, self.nvml.nvmlDeviceGetGraphicsRunningProcesses):
            procs += [p.pid for p in fn(self.handle)]
        return [(pid, process_name(pid)) for pid in sorted(set(procs) - mine)]


class CpuProbe:
    """Other processes' CPU use as a share of the machine: (share, [(pid, name)] of the busiest)."""

    def __init__(self) -> None:
        self.me = psutil.Process()

    def load(self) -> tuple[float, list[tuple[int, str]]]:
        mine = {self.me.pid} | {p.pid for p in self.me.children(recursive=True)}
        total = psutil.cpu_percent(interval=None) / 100.0  # whole machine since the last call
        own = sum(safe_cpu(p) for p in [self.me, *self.me.children(recursive=True)]) / 100.0 / (os.cpu_count() or 1)
        busiest = sorted(((safe_cpu(p), p.pid, p.info["name"]) for p in psutil.process_iter(["name"])
                          if p.pid not in mine), reverse=True)[:3]
        return max(0.0, total - own), [(pid, name) for pct, pid, name in busiest if pct > 5]


def process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def safe_cpu(p: psutil.Process) -> float:
    try:
        return p.cpu_percent(interval=None)
    except psutil.Error:
        return 0.0


class IdleDetector:
    def __init__(self, gpu_probe: NvmlProbe | None = None, cpu_probe: CpuProbe | None = None, cpu_threshold: float = 0.25,
                 quiet_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.gpu, self.cpu = gpu_probe, cpu_probe
        self.cpu_threshold, self.quiet_seconds, self.clock = cpu_threshold, quiet_seconds, clock
        self.last_busy: float | None = None  # when someone else last used the machine
        self.last_reason = ""

    def busy_reason(self) -> str:
        """Why the machine is busy right now, or ''."""
        if self.gpu is not None:
            others = self.gpu.others()
            if others:
                users = ", ".join(f"{name} (pid {pid})" for pid, name in others[:3])
                return f"GPU busy: {users} {'is' if len(others) == 1 else 'are'} using it"
        elif self.cpu is not None:
            share, who = self.cpu.load()
            if share > self.cpu_threshold:
                names = ", ".join(f"{name} (pid {pid})" for pid, name in who) or "other processes"
                return f"CPU busy: {names} use {share:.0%} of the CPU"
        return ""

    def check(self) -> tuple[bool, str]:
        """(may_train, reason): busy now, or quiet for less than quiet_seconds, means wait."""
        now = self.clock()
        reason = self.busy_reason()
        if reason:
            self.last_busy, self.last_reason = now, reason
            return False, reason
        if self.last_busy is not None and now - self.last_busy < self.quiet_seconds:
            left = self.quiet_seconds - (now - self.last_busy)
            return False, f"{self.last_reason.split(':')[0]} recently: resuming after {left:.0f} s of quiet"
        return True, ""


def idle_detector(device: "torch.device") -> IdleDetector:
    """--idle-only's detector for training on `device`: NVML's processes on a GPU, or the other
    processes' CPU use on a machine without one."""
    on_gpu = device.type == "cuda"
    return IdleDetector(gpu_probe=NvmlProbe(device.index or 0) if on_gpu else None,
                        cpu_probe=None if on_gpu else CpuProbe())
