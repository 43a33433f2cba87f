"""The step messages on the wire (elastic.messages): only what differs from the defaults travels, and what
arrives equals what was sent."""
import ray.cloudpickle as cloudpickle  # what Ray pickles actor-call arguments and returns with

from datasets import DocRange
from elastic.messages import StepCall, StepChaos, StepReport, WorkerStatus


def _wire(obj):
    data = cloudpickle.dumps(obj, protocol=5)
    return cloudpickle.loads(data), len(data)


def test_a_demo_steps_messages_round_trip_and_stay_small():
    call = StepCall(12, [DocRange(0, 3, 120, 124), DocRange(0, 3, 130, 131)], 0.0029, StepChaos(), 11,
                    [DocRange(0, 3, 124, 128)], [DocRange(0, 3, 123, 124)],
                    {"owned": [[0, 3, 120, 124]], "borrow": [0, 3, 119, 120], "skip": 37, "rows": 8, "slots": 8})
    report = StepReport("w1", 0, 12, True, tokens=1024, docs=5, loss=6.12, compute_s=1.23, read_s=0.001,
                        commit_s=0.02, fwd_bwd_s=1.1, step_s=1.9, bytes_sent=11712, bytes_received=11712,
                        dense_equivalent_bytes=27_400_000, codec_ms=312.4, comm_ms=45.2,
                        ahead_tokens=[[0, 3, 124, 210], [0, 3, 125, 96]], committed_step=11, fingerprint="9f2c1a7b")
    status = WorkerStatus("w1", "exchange", 1234, 3, 0, 12, 11, 4321)
    sizes = {}
    for msg in (call, report, status):
        back, sizes[type(msg).__name__] = _wire(msg)
        assert back == msg and type(back) is type(msg)
    ranges = _wire(call)[0].ranges
    assert ranges == call.ranges and all(type(r) is DocRange for r in ranges)
    # with field names and defaults these were 510, 594 and ~230 bytes
    assert sizes["StepCall"] < 300 and sizes["StepReport"] < 320 and sizes["WorkerStatus"] < 120, sizes


def test_non_default_fields_travel_and_defaults_are_rebuilt_fresh():
    failed = StepReport("w2", 1, 7, False)
    failed.update_error(RuntimeError("boom\nmore"), pre_exchange=True, bad_sender=0)
    back, _ = _wire(failed)
    assert back == failed and back.error == "RuntimeError: boom" and back.bad_sender == 0 and back.pre_exchange
    call = StepCall(3, [], 1e-3, StepChaos(hang=True))
    back_call, _ = _wire(call)
    assert back_call.chaos.hang and back_call.ranges == [] and back_call.prefetch is None
    a, _ = _wire(StepReport("w1", 0, 1, True))
    b, _ = _wire(StepReport("w1", 0, 2, True))
    a.dropped.append("x")  # mutable defaults are each message's own
    assert b.dropped == []
