"""Dry run of the data plan through a sequence of world sizes, with a worker death at each change.

Pure (plan only, no reading). What it proves for a given shard list: after world sizes e.g. 2 -> 3 -> 1,
uneven shares, one aborted step per change and a checkpoint round-trip (state_dict -> JSON -> a fresh
DataPlan) at each change, epoch 0 ends with every document delivered exactly once. The counts come from the
plan's delivery record, not from arithmetic on what should have happened.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

from datasets.plan import DataPlan, ShardInfo


def uneven_shares(world_size: int, tokens_per_rank: int) -> dict[int, int]:
    """Shares of a mixed cluster: odd ranks are 1.5x faster and take 1.5x the tokens."""
    return {r: int(tokens_per_rank * (1.5 if r % 2 else 1.0)) for r in range(world_size)}


def replay(shards: Sequence[ShardInfo], world_sizes: Sequence[int], seed: int = 1234,
           steps_per_phase: Optional[int] = None, tokens_per_rank: int = 8192) -> dict:
    if not world_sizes or any(w < 1 for w in world_sizes):
        raise ValueError(f"replay: world sizes must be >= 1, got {list(world_sizes)}")
    plan = DataPlan(shards, seed=seed)
    if steps_per_phase is None:
        # spread the epoch over the phases, leaving about one phase's worth for the final world
        mean_step = sum(sum(uneven_shares(w, tokens_per_rank).values()) for w in world_sizes) / len(world_sizes)
        total = sum(sh.token_estimate for sh in shards)
        steps_per_phase = max(1, int(total / mean_step / (len(world_sizes) + 1)))
    step, committed, aborted = 0, 0, 0
    phases = []

    def epoch0_done() -> bool:
        acc = plan.accounting(0)
        return acc["remaining"] == 0 and acc["in_flight"] == 0 and acc["returned"] == 0

    for i, world in enumerate(world_sizes):
        shares = uneven_shares(world, tokens_per_rank)
        phase = {"world_size": world, "steps_committed": 0, "aborted_step": None}
        last_phase = i == len(world_sizes) - 1
        k = 0
        while (k < steps_per_phase or last_phase) and not epoch0_done():
            plan.assign(step, shares)
            if not last_phase and k == steps_per_phase - 1:
                # a worker dies mid-batch: the step never commits; the coordinator checkpoints and resizes
                plan.abort(step)
                aborted += 1
                phase["aborted_step"] = step
                fresh = DataPlan(shards, seed=seed)
                fresh.load_state_dict(json.loads(json.dumps(plan.state_dict())))
                plan = fresh
            else:
                plan.commit(step)
                committed += 1
                phase["steps_committed"] += 1
                step += 1
            k += 1
        phases.append(phase)
    acc = plan.accounting(0)
    return {
        "documents": acc["documents"], "delivered_once": acc["delivered_once"],
        "duplicated": acc["duplicated"], "skipped": acc["skipped"], "filtered": acc["filtered"],
        "in_flight": acc["in_flight"], "epoch_complete": epoch0_done(),
        "steps_committed": committed, "steps_aborted": aborted, "steps_per_phase": steps_per_phase,
        "phases": phases, "seed": seed,
    }
