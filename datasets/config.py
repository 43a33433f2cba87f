"""Options of data sources, filtering and tokenization (the `data` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class DataConfig:
    # fsspec URL or glob: local path, s3://bucket/prefix/**/*.parquet, gs://...; "sample" = bundled corpus
    source: str = "sample"
    val_source: Optional[str] = "sample-val"   # held-out documents for val_loss; null disables
    text_column: str = "text"
    tokenizer: str = "gpt2"                    # gpt2 (tiktoken, offline vocabulary) | bytes
    seed: int = 1234
    min_language_score: Optional[float] = None
    min_int_score: Optional[int] = None        # FineWeb-Edu
    max_doc_tokens: int = 65536                # longer documents are truncated (counted warning)
    prefetch_row_groups: int = 4
    retries: int = 5
    retry_backoff_s: float = 0.5
    read_timeout_s: float = 120.0              # a step's documents not read by then: the run stops (DataSourceUnavailable)
    # passed to fsspec: endpoint_url, key, secret, anon, ... (credentials never logged or saved)
    storage_options: dict[str, Any] = field(default_factory=dict)
