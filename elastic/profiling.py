"""Where a worker's step time goes, measured inside the worker: `train.profile_at=N` runs torch.profiler
over steps N .. N + `train.profile_steps` - 1 and puts a summary in that step's report, which the
coordinator keeps in summary.json (`profiles`, per worker).

The summary says what a run's timing columns cannot: how busy the GPU was (kernel time / wall time), the
CPU time of the step's phases (commit, read, fwd_bwd, exchange), the largest kernels and CPU ops, and how
often the host waited on or allocated from the device (cudaStreamSynchronize, cudaMalloc...). Costs nothing
when off: the phase markers are null contexts.
"""
from __future__ import annotations

import contextlib
import time

PHASES = ("commit", "read", "fwd_bwd", "exchange")
RUNTIME_CALLS = ("cudaMalloc", "cudaFree", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
                 "cudaLaunchKernel")


class StepProfiler:
    """torch.profiler around steps [first, first + steps) of one worker."""

    def __init__(self, first: int, steps: int, cuda: bool):
        self.first, self.steps, self.cuda = first, max(1, steps), cuda
        self._prof = None
        self._t0 = 0.0
        self._began = first
        self._done = first < 0

    def start(self, step: int) -> None:
        if self._done or self._prof is not None or step < self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        self._t0 = time.perf_counter()
        self._began = step

    def active_at(self, step: int) -> bool:
        """Whether `step` is (or may be) profiled: a step computed ahead of its call would escape the profile."""
        return not self._done and (self._prof is not None or step >= self.first)

    def phase(self, name: str):
        if self._prof is None:
            return contextlib.nullcontext()
        from torch.profiler import record_function

        return record_function(name)

    def finish(self, step: int) -> dict | None:
        """After a step: the summary once the last profiled step is done, else None."""
        if self._prof is None or step < self._began + self.steps - 1:
            return None
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof, self._done = self._prof, None, True
        prof.__exit__(None, None, None)
        return summarize(prof.events(), step - self._began + 1, wall, self.cuda)


def summarize(events, steps: int, wall_s: float, cuda: bool) -> dict:
    """The per-step summary of profiler `events` over `steps` steps that took `wall_s` seconds."""
    per = lambda us: round(us / 1e3 / steps, 3)  # noqa: E731 - microseconds in total -> ms per step
    out: dict = {"steps": steps, "wall_ms_per_step": round(wall_s * 1e3 / steps, 3)}
    phases = {p: 0.0 for p in PHASES}
    cpu_ops: dict[str, float] = {}
    kernels: dict[str, float] = {}
    calls = {c: 0 for c in RUNTIME_CALLS}
    for e in events:
        if e.device_type.name == "CUDA":
            if e.name not in phases:  # kernels and copies, not the GPU side of our phase markers
                kernels[e.name[:80]] = kernels.get(e.name[:80], 0.0) + e.device_time_total
            continue
        if e.name in phases:
            phases[e.name] += e.cpu_time_total
        elif e.name in calls:
            calls[e.name] += 1
        else:
            cpu_ops[e.name[:80]] = cpu_ops.get(e.name[:80], 0.0) + e.self_cpu_time_total
    out["phases_cpu_ms_per_step"] = {p: per(t) for p, t in phases.items()}
    out["top_cpu_ops_ms_per_step"] = {k: per(v) for k, v in sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:10]}
    if cuda:
        gpu = sum(kernels.values())
        out["gpu_kernel_ms_per_step"] = per(gpu)
        out["gpu_busy_fraction"] = round(gpu / 1e6 / wall_s, 3) if wall_s > 0 else None
        out["top_kernels_ms_per_step"] = {k: per(v) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:10]}
        out["cuda_runtime_calls_per_step"] = {c: round(n / steps, 1) for c, n in calls.items()}
    return out
