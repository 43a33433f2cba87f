"""raydistro datasets: URL -> shards -> DataPlan (who reads which rows) -> token documents -> packed rows.

The contract other packages use (docs/DESIGN.md, "datasets/ contract"; details in docs/datasets.md):
    discover(url, storage_options) -> list[ShardInfo]          footers only, sorted
    discover_usable(url, data_config[, known]) -> list[ShardInfo]   discover + check_text_column
    DataPlan(shards, seed, epoch).assign/commit/abort/state_dict/load_state_dict/accounting
    DocRange(shard, row_group, start, stop)
    ShardReader(shards, storage_options, tokenizer, cfg).read(ranges) / .prefetch(ranges)
    get_tokenizer(name); pack(docs, seq_len, eot[, skip, rows]) -> (inputs, targets)
    split_windows(rows with token counts, shares, seq_len) -> a step cut between ranks at token level
    ensure_sample(split) -> local path of the bundled Shakespeare corpus
Knows fsspec, pyarrow and tokenizers; nothing of models or Ray.
"""
from datasets.config import DataConfig
from datasets.packing import IGNORE_INDEX, WindowMismatch, pack
from datasets.plan import DataPlan, DocRange, PlanError, PlanStateMismatch, ShardInfo, Window, split_windows
from datasets.reader import DocBatch, ReadStats, ShardReader
from datasets.sample import SampleBuildError, ensure_sample
from datasets.sources import (DataSchemaError, DataSourceError, DataSourceUnavailable, discover,
                              discover_usable, resolve_source)
from datasets.tokenizer import Tokenizer, TokenizerError, get_tokenizer

__all__ = [
    "DataConfig", "DataPlan", "DocRange", "ShardInfo", "ShardReader", "DocBatch", "ReadStats",
    "discover", "discover_usable", "resolve_source", "pack", "IGNORE_INDEX", "Window", "WindowMismatch", "split_windows",
    "get_tokenizer", "Tokenizer", "ensure_sample",
    "PlanError", "PlanStateMismatch", "DataSourceError", "DataSourceUnavailable", "DataSchemaError",
    "SampleBuildError", "TokenizerError",
]
