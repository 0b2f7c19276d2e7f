"""Idle detection, with the hardware boundary (NVML, the OS's CPU counters) replaced by scripted
probes; the decision logic under test is the real one."""

from gptswarm.worker.idle import CpuProbe, IdleDetector


class FakeNvml:
    def __init__(self):
        self.procs = []

    def others(self):
        return self.procs


class FakeCpu:
    def __init__(self):
        self.share, self.who = 0.0, []

    def load(self):
        return self.share, self.who


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_gpu_busy_then_quiet_period():
    gpu, clock = FakeNvml(), Clock()
    d = IdleDetector(gpu_probe=gpu, quiet_seconds=60, clock=clock)
    assert d.check() == (True, "")
    gpu.procs = [(4242, "blender")]
    assert d.check() == (False, "GPU busy: blender (pid 4242) is using it")
    gpu.procs = []
    clock.t = 30
    ok, reason = d.check()
    assert not ok and reason == "GPU busy recently: resuming after 30 s of quiet"
    clock.t = 61
    assert d.check() == (True, "")


def test_gpu_probe_wins_over_cpu_load_on_gpu_machines():
    gpu, cpu = FakeNvml(), FakeCpu()
    cpu.share = 0.9  # a GPU worker does not care that the CPU is busy
    assert IdleDetector(gpu_probe=gpu, cpu_probe=cpu).check() == (True, "")


def test_cpu_threshold():
    cpu, clock = FakeCpu(), Clock()
    d = IdleDetector(cpu_probe=cpu, cpu_threshold=0.25, quiet_seconds=10, clock=clock)
    cpu.share = 0.2
    assert d.check()[0]
    cpu.share, cpu.who = 0.8, [(7, "make")]
    assert d.check() == (False, "CPU busy: make (pid 7) use 80% of the CPU")


def test_real_cpu_probe_reads_this_machine():
    share, who = CpuProbe().load()
    assert 0.0 <= share <= 1.0 and isinstance(who, list)
