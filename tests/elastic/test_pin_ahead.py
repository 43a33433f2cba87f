"""A CUDA worker pins its checkpoint buffers once, at set-up (`checkpoint.pin_ahead`): `prepare` runs before
every step too and must not pin again, and its first snapshot copies into those buffers instead of staging
on the device and pinning in the write thread while steps run."""
import pytest
import torch

from elastic.checkpoint import HostSnapshot, state_trees

from .conftest import solo_replica

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("sync", ["demo", "dense"])
def test_a_cuda_worker_pins_once_and_its_first_snapshot_pins_nothing(sync):
    rep, _ = solo_replica("train.device=cuda", f"sync.name={sync}")
    rep.prepare()
    pooled = rep.checkpoint_writes.pinned.pooled_bytes()
    assert pooled > 0
    rep.prepare()  # before a step: a no-op once done
    assert rep.checkpoint_writes.pinned.pooled_bytes() == pooled
    files = {"model.pt": "model", "sync-rank0.pt": "sync"}
    snap = HostSnapshot(state_trees(files, rep.model, rep.sync), clone_host=False, pool=rep.checkpoint_writes.pinned)
    cuda_tensors = [t for t in state_trees(files, rep.model, rep.sync)["model.pt"].values() if t.is_cuda]
    assert snap.staged == 0 and len(snap.pinned) >= len(cuda_tensors)
    snap.wait()
    snap.release()
