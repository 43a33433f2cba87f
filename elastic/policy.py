"""Decisions of the coordinator as plain functions from observations to decisions, tested without Ray.

In the manner of Ray Train V2's controller: the coordinator (elastic/coordinator.py) observes (reports,
deaths, pings, drain notices, ready joiners) and carries decisions out; it never works them out inline.

- `CoordinatorState`: the typed states of a run and which ones end it.
- `liveness`: who is silent (no sign of life for `silent_peer_s`) or stuck (alive, no progress), measured from
  their last sign of life, so recovery is timed from the fault, not from when someone noticed.
- `decide_failure`: after a step, commit it, retry it, re-form the group, evict whom, or stop.
- `resolve_fingerprints`: replicas that disagree after a commit are re-synced from the majority; repeat
  offenders are evicted.
- `decide_scaling`: between steps, who leaves (drains, scale-downs), who joins, how many to ask for.
"""
from __future__ import annotations

import enum
import statistics
from collections import Counter
from dataclasses import dataclass, field

from elastic.messages import StepReport

MAX_ATTEMPTS_PER_STEP = 5


class CoordinatorState(str, enum.Enum):
    FORMING = "FORMING"      # waiting for the first workers, forming the first group
    RUNNING = "RUNNING"
    RESIZING = "RESIZING"    # a membership change: stop the generation, checkpoint, re-form
    PAUSED = "PAUSED"        # below train.min_workers: checkpointed, waiting for capacity
    ADOPTING = "ADOPTING"    # a restarted coordinator re-adopting the live workers
    STOPPING = "STOPPING"    # final checkpoint and evaluation
    FINISHED = "FINISHED"
    STOPPED = "STOPPED"      # stopped on request (stop_at, a signal, `ray job stop`), checkpointed
    ERRORED = "ERRORED"

    @property
    def is_terminal(self) -> bool:
        return self in (CoordinatorState.FINISHED, CoordinatorState.STOPPED, CoordinatorState.ERRORED)


# ---- liveness -------------------------------------------------------------------------------------------
# phases in which a worker must make progress on its own; in the exchange it waits for its peers, and a
# read has its own bound (data.read_timeout_s), so neither counts as stuck
WORKING_PHASES = ("compute", "hung")


def silent_peer_limit(configured_s: float, recent_step_s: list[float]) -> float:
    """`train.silent_peer_s`, or by default the larger of 10 s and 5x the median recent step."""
    if configured_s > 0:
        return configured_s
    median = statistics.median(recent_step_s[-20:]) if len(recent_step_s) >= 3 else 0.0
    return max(10.0, 5.0 * median)


@dataclass
class PeerObservation:
    """What the coordinator knows of one worker that has not reported the step yet."""
    last_seen: float                 # the last answer of any kind (report, ping): its last sign of life
    phase: str = "compute"
    progress: int = 0
    progress_at: float = 0.0         # when `progress` last changed, as the coordinator saw it


@dataclass
class Liveness:
    silent: list[str] = field(default_factory=list)   # no sign of life for the limit: a frozen VM, a partition
    stuck: list[str] = field(default_factory=list)    # answers, but makes no progress where it must
    collective_stuck: bool = False                    # everyone waits in the exchange, nobody to blame
    noticed_at: float = 0.0                           # when the coordinator knew something was wrong

    @property
    def anyone(self) -> bool:
        return bool(self.silent or self.stuck or self.collective_stuck)


def liveness(pending: dict[str, PeerObservation], now: float, limit_s: float, waited_s: float,
             watchdog_s: float = float("inf")) -> Liveness:
    """Classify the workers whose reports are still missing. `waited_s`: how long the step has run;
    `watchdog_s` (`membership.watchdog_timeout`): past it, a worker still computing while its peers wait is a
    straggler too slow to keep (a step that takes `train.hang_factor` x the median), evicted as stuck."""
    out = Liveness()
    for wid, o in sorted(pending.items()):
        if now - o.last_seen > limit_s:
            out.silent.append(wid)
        elif o.phase in WORKING_PHASES and (now - o.progress_at > limit_s or waited_s > watchdog_s):
            out.stuck.append(wid)
    if not out.silent and not out.stuck and pending and waited_s > limit_s and all(
            o.phase == "exchange" and now - o.progress_at > limit_s for o in pending.values()):
        out.collective_stuck = True
    return out


def fault_time(observations: dict[str, PeerObservation], leaving: list[str], default: float) -> float:
    """When the fault happened: the earliest last sign of life among those who left."""
    times = [observations[w].last_seen for w in leaving if w in observations]
    return min(times) if times else default


# ---- one step's outcome -----------------------------------------------------------------------------------
@dataclass
class StepOutcome:
    step: int
    members: list[str]                          # worker ids in rank order
    reports: dict[str, StepReport]
    dead: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    collective_stuck: bool = False
    attempts: int = 1                           # this step's attempts so far, this one included


@dataclass
class FailureDecision:
    action: str                                 # commit | retry | regroup | evict | stop
    kind: str = ""                              # what the summary calls it: death, silent_peer, hang, ...
    leaving: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def commits(self) -> bool:
        return self.action == "commit"


def decide_failure(o: StepOutcome) -> FailureDecision:
    """What to do after step `o.step`. Every survivor applies a step or none does, so anything short of every
    member reporting ok drops the step (its rows go back to the plan) and it is retried:

    - nobody to blame (a non-finite dense all-reduce): retry with the same group;
    - the collective failed on ranks that closed their side, or hung with everyone inside it: re-form the
      group with the same members (`regroup`), then retry;
    - dead, silent or stuck workers, senders of garbage, workers that failed before the exchange (out of
      memory, a broken device) or whose commit of the previous step raised: they leave (`evict`);
    - the data source failed (nobody's fault) or the step failed too often: stop, checkpointed.
    """
    reports = o.reports
    commit_failed = [w for w, r in reports.items() if r.commit_failed]
    all_ok = (not o.dead and not o.silent and not o.stuck and not o.collective_stuck and not commit_failed
              and set(reports) >= set(o.members) and all(r.ok for r in reports.values()))
    if all_ok:
        return FailureDecision("commit")
    failed = {w: r for w, r in reports.items() if not r.ok}
    errors = "; ".join(f"{w}: {r.error}" for w, r in sorted(failed.items()) if r.error)
    data_errors = [r for r in failed.values() if r.data_error]
    if data_errors:
        return FailureDecision("stop", "data_error", reason=data_errors[0].error or "the data source failed")
    if o.attempts > MAX_ATTEMPTS_PER_STEP:
        return FailureDecision("stop", "step_failures",
                               reason=f"step {o.step} failed {o.attempts} times in a row; last errors: {errors}")
    # a worker that failed before the exchange abstained with a NaN weight, so its peers name it as a bad
    # sender: it is the origin, not a garbage sender. A window cut for other token counts than its documents
    # have is the data's doing, not the worker's: the step is retried in whole documents, nobody leaves.
    abstained = {w for w, r in failed.items() if r.pre_exchange}
    origins = {w for w in abstained if not failed[w].window_mismatch}
    bad_ranks = {r.bad_sender for r in failed.values() if r.bad_sender is not None}
    garbage = {o.members[k] for k in bad_ranks if 0 <= k < len(o.members)} - abstained
    leaving = set(o.dead) | set(o.silent) | set(o.stuck) | garbage | origins | set(commit_failed)
    if not leaving:
        if o.collective_stuck or any(r.left_group for r in failed.values()):
            # the collective failed with nobody to blame (a transient NCCL/gloo error): its ranks closed
            # their side, so re-form the group before the retry instead of retrying into a closed one
            return FailureDecision("regroup", "collective_error" if not o.collective_stuck else "collective_stuck",
                                   reason=errors)
        return FailureDecision("retry", "window_mismatch" if any(r.window_mismatch for r in failed.values())
                               else "rejected", reason=errors)
    kind = ("commit_error" if commit_failed else "corrupt_payload" if garbage and not origins
            else "silent_peer" if o.silent else "hang" if o.stuck else "death" if o.dead
            else "worker_error")
    ordered = [w for w in o.members if w in leaving]
    return FailureDecision("evict", kind, ordered, reason=errors)


# ---- replicas that disagree ----------------------------------------------------------------------------
@dataclass
class ReplicaVerdict:
    agree: bool
    source: str | None = None                   # a member holding the majority's parameters
    resync: list[str] = field(default_factory=list)
    evict: list[str] = field(default_factory=list)


def resolve_fingerprints(prints: dict[str, str], members: list[str], strikes: dict[str, int],
                         max_strikes: int = 2) -> ReplicaVerdict:
    """Fingerprints after a commit, by worker. The majority's parameters win (a tie goes to the group with the
    oldest member, rank order); the others are re-synced from a majority peer. A worker that disagrees
    `max_strikes` times is evicted: its device or memory is not to be trusted. `strikes` is updated."""
    if len(set(prints.values())) <= 1:
        return ReplicaVerdict(True)
    counts = Counter(prints.values())
    rank = {w: i for i, w in enumerate(members)}
    first_holder = {p: min((rank.get(w, 1 << 30) for w, q in prints.items() if q == p)) for p in counts}
    winner = max(counts, key=lambda p: (counts[p], -first_holder[p]))
    source = min((w for w, p in prints.items() if p == winner), key=lambda w: rank.get(w, 1 << 30))
    verdict = ReplicaVerdict(False, source)
    for w in sorted((w for w, p in prints.items() if p != winner), key=lambda w: rank.get(w, 1 << 30)):
        strikes[w] = strikes.get(w, 0) + 1
        (verdict.evict if strikes[w] >= max_strikes else verdict.resync).append(w)
    return verdict


# ---- scaling between steps ---------------------------------------------------------------------------------
@dataclass
class ScalingObservation:
    members: list[str]
    pending: int                                # workers asked for, not ready yet
    ready: list[str]                            # workers that became ready since the last look
    target: int                                 # workers the run wants now
    min_workers: int
    max_workers: int
    grow: bool                                  # keep demand up to max_workers outstanding (autoscaling)
    draining: list[str] = field(default_factory=list)     # members with a drain notice
    scale_leaving: list[str] = field(default_factory=list)  # members a `scale N` asked to leave
    spawn_failures: int = 0                     # workers that failed to start, in a row
    now: float = 0.0
    last_spawn_failure_at: float = 0.0


@dataclass
class ScalingDecision:
    leave: list[str] = field(default_factory=list)
    leave_kind: str = ""                        # drain | scale
    join: list[str] = field(default_factory=list)
    spawn: int = 0                              # new workers to ask for
    cancel: int = 0                             # pending requests to withdraw
    target: int = 0


SPAWN_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def spawn_backoff_s(failures_in_row: int) -> float:
    """A worker that fails to start (a bad image, an exception in its setup) is asked for again, but not in a
    tight loop: 0, 1, 2, 5, 10, 30, then every 60 s."""
    return SPAWN_BACKOFF_S[min(failures_in_row, len(SPAWN_BACKOFF_S) - 1)]


def capped_scale_target(requested: int, min_workers: int, max_workers: int) -> int:
    """`python -m elastic scale RUN N`: the target, kept within [train.min_workers, train.max_workers]."""
    return max(min_workers, min(int(requested), max_workers))


def decide_scaling(o: ScalingObservation) -> ScalingDecision:
    d = ScalingDecision(target=o.target)
    leaving = [w for w in o.members if w in set(o.draining) | set(o.scale_leaving)]
    if leaving:
        # drained workers leave after their last committed step and the target shrinks with them; a scale
        # request already set the target it wants
        shrink = len([w for w in leaving if w not in o.scale_leaving])
        d.target = max(o.min_workers, o.target - shrink)
        d.leave, d.leave_kind = leaving, ("drain" if shrink else "scale")
    d.join = list(o.ready)
    want = max(d.target, o.max_workers) if o.grow else d.target
    staying = len(o.members) - len(leaving) + len(o.ready)
    if staying + o.pending > want:
        d.cancel = min(o.pending, staying + o.pending - want)
    elif o.now - o.last_spawn_failure_at >= spawn_backoff_s(o.spawn_failures):
        d.spawn = max(0, want - staying - o.pending)
    return d
