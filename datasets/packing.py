"""Packing tokenized documents into fixed-length training rows.

Promise: every token of every document handed to `pack` is a target exactly once. The stream is
`EOT doc0 EOT doc1 EOT ... docN EOT`; the leading EOT means a document's first token is predicted too, and
the last row is padded (inputs EOT, targets -1). (`StepLoader.load(cut=True)` may instead stop a step after its
last full row and start the next step's stream with the rest of the last document, `datasets.Carry`: the
document is still delivered with the first step, and the data plan keeps the carry in its state.)

Within one step, ranks may cut that stream between them at any token (`pack(..., skip=, rows=)` with a window
from `datasets.split.split_windows`): a document at a cut is read by both neighbours and each trains on its own
part of it, so every rank gets whole rows and only the step's last row is padded.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -1


class WindowMismatch(ValueError):
    """The documents read for a window do not have the token counts the window was cut for."""


def stream_slots(docs: Sequence[Sequence[int]]) -> int:
    """Target slots of the stream of `docs`: t + 1 for a document of t tokens (its tokens and the EOT after)."""
    return sum(len(d) for d in docs) + len(docs)


def pack(docs: Sequence[Sequence[int]], seq_len: int, eot: int, skip: int = 0, rows: int | None = None,
         expect_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs LongTensor[n, seq_len], targets LongTensor[n, seq_len]); targets -1 where padded.

    Default: the whole stream, n = ceil((total document tokens + number of documents) / seq_len); zero
    documents give n = 0. With `rows`: the window of `rows` rows starting `skip` slots into the stream (a
    rank's part of a step cut at token level); slots past the stream's end are padding. `expect_slots`: the
    stream's slot count the window was cut for; another count raises WindowMismatch (the window would train
    some tokens twice or never).
    """
    if seq_len < 1:
        raise ValueError(f"pack: seq_len must be >= 1, got {seq_len}")
    n_targets = stream_slots(docs)
    if expect_slots is not None and n_targets != expect_slots:
        raise WindowMismatch(f"pack: the window was cut for {expect_slots} target slots but its {len(docs)} "
                             f"documents have {n_targets}")
    if rows is None:
        skip, rows = 0, -(-n_targets // seq_len)
    elif rows < 0 or skip < 0 or (rows > 0 and skip >= n_targets):
        raise ValueError(f"pack: window skip={skip}, rows={rows} lies outside a stream of {n_targets} slots")
    if rows == 0:
        empty = torch.empty((0, seq_len), dtype=torch.long)
        return empty, empty.clone()
    # one int64 buffer filled document by document: numpy converts each list in C, where a Python list of the
    # whole stream handed to torch.tensor is converted token by token (docs/BENCHMARKS.md has both timed)
    end = skip + rows * seq_len
    flat = np.full(max(end, n_targets) + 1, eot, dtype=np.int64)
    pos = 1
    for doc in docs:
        flat[pos:pos + len(doc)] = doc
        pos += len(doc) + 1  # the EOT after it is already there
    inputs = torch.from_numpy(flat[skip:end])
    targets = torch.from_numpy(flat[skip + 1:end + 1].copy())  # own memory: the padding must not reach inputs
    if n_targets < end:
        targets[n_targets - skip:] = IGNORE_INDEX
    return inputs.view(rows, seq_len), targets.view(rows, seq_len)
