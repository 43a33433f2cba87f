"""Membership policy: who is in the group, what share each gets, when a worker is declared hung.

Plain objects, no Ray: the coordinator asks these questions and acts on the answers.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Member:
    worker_id: str                   # stable name, e.g. "w3"
    accelerator: str                 # "A100", "L4", "H100", "CPU", ...
    node_id: str
    device: str
    tokens_per_s: float = 0.0        # measured compute throughput (EMA), 0 until measured


@dataclass
class MembershipGeneration:
    """One fixed membership: ranks are positions in `members`."""
    generation: int
    members: list[Member] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return len(self.members)


def compute_shares(
    members: list[Member],
    batch_tokens: int,
    balance: str = "auto",
    pinned: dict[str, int] | None = None,
    seq_len: int = 1,
) -> list[int]:
    """Tokens each rank should process this step, summing to about `batch_tokens`.

    - pinned accelerator types get exactly their configured tokens;
    - `equal` splits the rest evenly (deterministic: used for homogeneous groups, so a resumed run
      replays the same batches);
    - `throughput` splits it in proportion to measured tokens/s, so a fast GPU takes more and all
      finish the step at about the same time; `auto` picks throughput only for mixed accelerators.
    Every rank gets at least one sequence.
    """
    pinned = pinned or {}
    n = len(members)
    if n == 0:
        return []
    shares = [0] * n
    free = [i for i, m in enumerate(members) if m.accelerator not in pinned]
    for i, m in enumerate(members):
        if m.accelerator in pinned:
            shares[i] = int(pinned[m.accelerator])
    remaining = max(0, batch_tokens - sum(shares))
    mode = balance
    if mode == "auto":
        kinds = {members[i].accelerator for i in free}
        mode = "throughput" if len(kinds) > 1 else "equal"
    if free:
        rates = [members[i].tokens_per_s for i in free]
        if mode == "throughput" and all(r > 0 for r in rates):
            total = sum(rates)
            raw = [remaining * r / total for r in rates]
        else:
            raw = [remaining / len(free)] * len(free)
        # round to whole sequences, largest remainder, deterministic tie-break by rank
        units = [x / seq_len for x in raw]
        floors = [int(u) for u in units]
        target_units = round(remaining / seq_len)
        order = sorted(range(len(free)), key=lambda j: (-(units[j] - floors[j]), j))
        for j in order[: max(0, target_units - sum(floors))]:
            floors[j] += 1
        for j, i in enumerate(free):
            shares[i] = floors[j] * seq_len
    return [max(seq_len, s) for s in shares]


def watchdog_timeout(recent_step_s: list[float], floor_s: float, factor: float) -> float:
    """Seconds to wait for a step before declaring the stragglers hung.

    gloo blocks forever on a peer that is alive but silent, so a deadline derived from recent step
    times is the only way to notice it. Until a few steps are measured, the floor applies.
    """
    if len(recent_step_s) < 3:
        return floor_s
    return max(floor_s, factor * statistics.median(recent_step_s[-20:]))
