"""raydistro datasets: URL -> shards -> DataPlan (who reads which rows) -> token documents -> packed rows.

The contract other packages use (docs/DESIGN.md, "datasets/ contract"; details in docs/datasets.md):
    discover(url, storage_options) -> list[ShardInfo]          footers only, sorted
    discover_usable(url, data_config[, known]) -> list[ShardInfo]   discover + check_text_column
    DataPlan(shards, seed, epoch).assign/commit/abort/state_dict/load_state_dict/accounting
    DocRange(shard, row_group, start, stop)
    ShardReader(shards, storage_options, tokenizer, cfg).read(ranges) / .prefetch(ranges)
    get_tokenizer(name); pack(docs, seq_len, eot[, skip, rows]) -> (inputs, targets)
    StepLoader(shards, cfg, seq_len).load(ranges[, window, prefetch, margin]) -> StepBatch   one rank's step
        (read, packed, token-counted; the next step read ahead), .ahead_tokens() -> its rows' token counts
    rebalance / split_windows / windows_for / read_margin   splitting a step between ranks (datasets.split)
    ensure_sample(split) -> local path of the bundled Shakespeare corpus
Knows fsspec, pyarrow and tokenizers; nothing of models or Ray.
"""
from datasets.config import DataConfig
from datasets.packing import IGNORE_INDEX, WindowMismatch, pack
from datasets.plan import DataPlan, DocRange, PlanError, PlanStateMismatch, ShardInfo
from datasets.readahead import ReadTimedOut
from datasets.reader import DocBatch, ReadStats, ShardReader
from datasets.sample import SampleBuildError, ensure_sample
from datasets.sources import (DataSchemaError, DataSourceError, DataSourceUnavailable, discover,
                              discover_usable, resolve_source)
from datasets.split import Carry, Window, read_margin, rebalance, split_windows, windows_for
from datasets.step_loader import StepBatch, StepLoader
from datasets.tokenizer import Tokenizer, TokenizerError, get_tokenizer

__all__ = [
    "DataConfig", "DataPlan", "DocRange", "ShardInfo", "ShardReader", "DocBatch", "ReadStats",
    "discover", "discover_usable", "resolve_source", "pack", "IGNORE_INDEX",
    "StepLoader", "StepBatch", "Carry", "Window", "WindowMismatch", "split_windows", "windows_for", "rebalance", "read_margin",
    "get_tokenizer", "Tokenizer", "ensure_sample",
    "PlanError", "PlanStateMismatch", "DataSourceError", "DataSourceUnavailable", "DataSchemaError",
    "SampleBuildError", "TokenizerError", "ReadTimedOut",
]
