"""Packing tokenized documents into fixed-length training rows.

Promise: every token of every document handed to `pack` is a target exactly once. The stream is
`EOT doc0 EOT doc1 EOT ... docN EOT`; the leading EOT means a document's first token is predicted too, and
the last row is padded (inputs EOT, targets -1) instead of carrying its tail into a later step, because a
later step may run on a different world (the data plan must be able to call these documents delivered
when this step commits).
"""
from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -1


def pack(docs: Sequence[Sequence[int]], seq_len: int, eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs LongTensor[n, seq_len], targets LongTensor[n, seq_len]); targets -1 where padded.

    n = ceil((total document tokens + number of documents) / seq_len); zero documents give n = 0.
    """
    if seq_len < 1:
        raise ValueError(f"pack: seq_len must be >= 1, got {seq_len}")
    if not docs:
        empty = torch.empty((0, seq_len), dtype=torch.long)
        return empty, empty.clone()
    stream: list[int] = [eot]
    for doc in docs:
        stream.extend(doc)
        stream.append(eot)
    n_targets = len(stream) - 1
    n_rows = -(-n_targets // seq_len)
    flat = torch.tensor(stream, dtype=torch.long)
    inputs = torch.full((n_rows * seq_len,), eot, dtype=torch.long)
    targets = torch.full((n_rows * seq_len,), IGNORE_INDEX, dtype=torch.long)
    inputs[:n_targets] = flat[:-1]
    targets[:n_targets] = flat[1:]
    return inputs.view(n_rows, seq_len), targets.view(n_rows, seq_len)
