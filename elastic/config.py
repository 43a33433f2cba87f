"""The one typed configuration of a run: every option, its default and its validation.

`RunConfig` composes the sections owned by the packages they configure (`compression.SyncConfig`,
`datasets.DataConfig`) with the sections `elastic` owns. Presets in `elastic/configs/*.yaml` only
override defaults; `load_config` merges preset < file < dotlist overrides and validates, turning every
mistake into one `ConfigError` line that names the key and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    OmegaConfBaseException,
    ValidationError,
)

from compression.config import SyncConfig, sync_option_problem
from datasets.config import DataConfig

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "tiny"


class ConfigError(ValueError):
    """A configuration mistake, phrased as one line naming the key and the fix."""


@dataclass
class RunSection:
    name: str = "default"            # runs/<name>/ holds checkpoints and summary.json
    dir: str = "runs"                # parent of run directories (local path)
    seed: int = 0


@dataclass
class TrainSection:
    steps: int = 50                  # total optimizer steps (a resumed run continues up to this)
    stop_at: int = 0                 # stop, checkpointed, on reaching this step (0 = run to the end); rerun resumes
    workers: int = 2                 # workers to start with
    min_workers: int = 1             # below this the run pauses (checkpointed) until capacity returns
    max_workers: int = 0             # 0 = same as workers; above `workers` the group grows onto new capacity
    seq_len: int = 128
    batch_tokens: int = 2048         # global tokens per step, split across workers by share
    micro_batch_tokens: int = 8192   # tokens per forward/backward inside a worker (memory bound)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0           # per-worker gradient norm clip before the exchange; 0 disables
    device: str = "auto"             # auto | cpu | cuda
    dtype: str = "float32"           # float32 | bfloat16 (autocast on cuda)
    threads_per_worker: int = 1      # torch CPU threads in each worker
    worker_cpus: float = 1.0
    worker_gpus: float = -1.0        # -1 = from train.device: cuda 1, cpu 0, auto 1 if the cluster has or can add GPUs
    accelerators: list[str] = field(default_factory=list)  # e.g. [H100, A100]: only nodes of these types (GPU)
    balance: str = "auto"            # auto | equal | throughput: how per-worker shares are set
    batch_tokens_by_accelerator: dict[str, int] = field(default_factory=dict)  # pin e.g. {A100: 4096}
    eval_every: int = 0              # score the held-out set every N committed steps (summary val_history); 0 = only at the end
    eval_tokens: int = 16384         # held-out tokens scored for val_loss
    step_timeout_s: float = 60.0     # watchdog floor; also the first steps' limit
    hang_factor: float = 8.0         # watchdog = max(floor, factor * median recent step time)
    silent_peer_s: float = 0.0       # no sign of life this long = evicted; 0 = max(10, 5 x median step)
    orphan_timeout_s: float = 120.0  # a worker whose coordinator is gone for good this long exits
    coordinator_restarts: int = 5    # Ray restarts a dead coordinator this often; it re-adopts the live workers
    state_transfer_timeout_s: float = 300.0  # a joiner's state from a live peer, or a fingerprint, must arrive by then
    state_codec: str = "zstd"        # zstd | none: a joiner's state on the wire (lossless; pays below ~200 Mbit/s)
    collective_timeout_s: float = 0.0  # gloo rendezvous/op timeout; 0 = max(60, 4 x step_timeout_s)
    pause_timeout_s: float = 600.0   # how long to wait below min_workers before giving up (checkpointed)
    start_wait_s: float = 60.0       # wait this long for all train.workers, then start with those ready
    log_every: int = 10              # plain log line cadence when not on a terminal
    prefetch: bool = True            # workers read + tokenize the likely next step's documents during this step
    prefetch_in: str = "auto"        # auto | process | thread: where the read-ahead runs (auto: process on CUDA)
    balance_rows: bool = True        # with prefetch: split each step's documents by their real token counts
    split_docs: bool = True          # with balance_rows: cut each step between ranks at token level (whole rows)
    apply_ahead: bool = True         # apply an exchanged step while the coordinator decides (undone on abort)
    carry_tail: bool = True          # a step ends after its last full row, the rest of its last document starts
                                     # the next step (no padded row; docs/DESIGN.md, "Carried tails")
    compute_ahead: bool = True       # with apply_ahead: start the next step's fwd/bwd on its read-ahead rows before
                                     # its call arrives, where the coordinator fixes those rows (one rank, or no
                                     # balance_rows); a call that brings other rows or parameters discards it
    attention_warm_rows: int = 32    # CUDA: build attention graphs for micro-batches of 1..N rows before training
    profile_at: int = -1             # >= 0: torch.profiler on every worker from this step (summary.json: profiles)
    profile_steps: int = 3           # how many steps profile_at covers
    compile: str = "auto"            # auto | true | false: torch.compile the workers' forward+loss (auto: on CUDA only)
    fingerprint_every: int = 0       # replica fingerprint every N committed steps; 0 = auto (CUDA 10, CPU 1)


@dataclass
class ModelSection:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 0              # 0 = tokenizer's vocabulary padded to a multiple of 64
    dropout: float = 0.0
    tie_embeddings: bool = True
    # a Hugging Face causal LM instead of the built-in GPT: a local directory with config.json (offline only);
    # the shape fields above are then ignored (vocab_size, if set, overrides the config's)
    hf: str = ""
    hf_weights: bool = False         # with hf: load the directory's weights (else random init from run.seed)


@dataclass
class CheckpointSection:
    dir: str = ""                    # "" = runs/<name>/checkpoints; local path or s3://bucket/prefix
    every: int = 50                  # also written at every membership change and at the end
    keep: int = 3
    storage_options: dict[str, Any] = field(default_factory=dict)
    write_timeout_s: float = 600.0   # a checkpoint not written by then is abandoned (the previous one stays)
    # CUDA workers pin host buffers for their state (parameters + sync state) at set-up, so their first
    # checkpoint holds training as briefly as later ones; costs that much page-locked host memory per worker
    pin_ahead: bool = True


@dataclass
class ChaosSection:
    """Fault injection at given steps, so users can rehearse failures on their own cluster."""
    kill_at: list[int] = field(default_factory=list)             # kill a worker mid-step
    add_at: list[int] = field(default_factory=list)              # start one more worker
    drain_at: list[int] = field(default_factory=list)            # a worker gets a drain notice
    hang_at: list[int] = field(default_factory=list)             # a worker stops answering mid-step
    corrupt_payload_at: list[int] = field(default_factory=list)  # a worker sends a garbage payload
    comm_error_at: list[int] = field(default_factory=list)       # the collective fails on every rank
    window_mismatch_at: list[int] = field(default_factory=list)  # a token-level window that misfits its documents
    commit_error_at: list[int] = field(default_factory=list)     # applying the previous step raises on a worker
    diverge_at: list[int] = field(default_factory=list)          # a worker's parameters drift after a commit
    prepare_error: list[str] = field(default_factory=list)       # these workers' setup raises (e.g. [w3])
    remove_node_at: list[int] = field(default_factory=list)      # remove a simulated node (needs cluster.simulate)
    add_node_at: list[int] = field(default_factory=list)         # add a simulated node (needs cluster.simulate)
    seed: int = 0                                                # picks the victim ranks


@dataclass
class ClusterSection:
    address: str = ""                # "" = RAY_ADDRESS, else a running local cluster, else start one
    num_cpus: Optional[int] = None   # for a Ray started here
    # simulate a multi-node cluster on this machine (ray.cluster_utils.Cluster), e.g. ["A100", "L4"]:
    # one node per entry with a logical GPU and an accelerator_type:<entry> resource
    simulate: list[str] = field(default_factory=list)
    simulate_node_cpus: int = 1
    gloo_socket_ifname: str = ""     # network interface gloo binds to (multi-NIC hosts)
    namespace: str = "raydistro"
    # Ray's own background traffic crosses the same links as the sync (docs/slowlink.md): defaults for
    # slow links, each overridable (cluster.ray_worker_env.KEY=VALUE). The workers' processes get these
    # (runtime_env env_vars): task events (the dashboard's task view) every 5 s instead of every second.
    ray_worker_env: dict[str, str] = field(default_factory=lambda: {"RAY_task_events_report_interval_ms": "5000"})
    # the Ray nodes raydistro starts itself (a local Ray, cluster.simulate; elastic.bench.slowlink's nodes) get these;
    # set them in the environment of `ray start` elsewhere. Each node's dashboard agent reports its stats (a JSON
    # of every process, ~35 kB) to the GCS every 15 s instead of 5 s; keep it under 2x
    # RAY_metrics_report_interval_ms (20 s), or the node's gauges drop out of Prometheus between reports.
    ray_node_env: dict[str, str] = field(default_factory=lambda: {"REPORTER_UPDATE_INTERVAL_MS": "15000"})


@dataclass
class WandbSection:
    project: str = ""                # "" = off; set (and `pip install wandb`) to log every step to W&B
    entity: str = ""
    mode: str = ""                   # "" = wandb's default | online | offline (files under runs/<name>/wandb) | disabled
    run_id: str = ""                 # resume this W&B run id (default: a new one)


@dataclass
class MlflowSection:
    uri: str = ""                    # "" = off; file:///abs/path or http(s)://server (`pip install mlflow`)
    experiment: str = "raydistro"


@dataclass
class TrackingSection:
    """Where a run's per-step metrics go while it trains (elastic/tracking.py)."""
    jsonl: bool = True               # runs/<name>/metrics.jsonl, one row per committed step
    tensorboard: bool = True         # runs/<name>/tensorboard/ event files
    flush_s: float = 1.0             # TensorBoard's events reach the disk (an fsync) at most this often; 0 = every step
    summary_every: int = 10          # rewrite summary.json every N committed steps (0 = only at the end)
    wandb: WandbSection = field(default_factory=WandbSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    train: TrainSection = field(default_factory=TrainSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    chaos: ChaosSection = field(default_factory=ChaosSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


# Credential keys are matched as whole words (segments split at _ - . and camelCase), so `batch_tokens`,
# `max_doc_tokens` or `tokenizer` stay readable while `key`, `secret`, `auth_token`, `aws_secret_access_key`,
# `sas_token`, `accountKey` or `connection_string` are redacted.
_SECRET_SEGMENTS = {"key", "keys", "secret", "secrets", "token", "password", "passwd", "pwd", "passphrase",
                    "credential", "credentials", "apikey", "sas", "sig", "signature"}
_SECRET_KEYS_WHOLE = {"connection_string", "connectionstring", "conn_str", "auth", "authorization"}
# inside string values: the password of `scheme://user:password@host` and the keys of Azure connection
# strings and SAS query strings (`AccountKey=...;`, `SharedAccessSignature=...`, `sig=...`)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^/@\s]+(?=@)")
_KEY_VALUE_SECRET = re.compile(r"(?P<head>(?:AccountKey|SharedAccessKey|SharedAccessSignature|sig|"
                               r"Password|Pwd)=)[^;&\s]+", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential (whole words only: `token` yes, `batch_tokens` no)."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    if words.replace("-", "_") in _SECRET_KEYS_WHOLE or key.lower() in _SECRET_KEYS_WHOLE:
        return True
    return any(w in _SECRET_SEGMENTS for w in re.split(r"[_.\-\s]+", words) if w)


def redact_value(text: str) -> str:
    """`text` with URL passwords and connection-string keys replaced by '***'."""
    return _KEY_VALUE_SECRET.sub(r"\g<head>***", _URL_PASSWORD.sub(r"\g<head>***", text))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(
        f"--config {name_or_path}: no such preset or YAML file; presets: {', '.join(preset_names())}"
    )


def _describe_type(cfg: DictConfig, dotted: str) -> str:
    parent_key, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    try:
        ref = node._get_node(leaf)  # type: ignore[union-attr]
        return getattr(ref, "_metadata").ref_type.__name__  # type: ignore[union-attr]
    except Exception:
        return "a value of the documented type"


def _allowed_keys(cfg: DictConfig, dotted: str) -> str:
    parent_key = dotted.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(node, DictConfig):
        return ", ".join(str(k) for k in node.keys())
    return "(none)"


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = e.full_key or str(e.key)
        prefix = f"{key.rpartition('.')[0]}." if "." in key else ""
        raise ConfigError(
            f"{origin}: unknown key '{key}'; allowed under '{prefix or '<root>'}': "
            f"{_allowed_keys(base, key)}"
        ) from None
    except (ValidationError, ConfigTypeError) as e:
        key = e.full_key or str(e.key)
        got = getattr(e, "msg", str(e)).split("\n")[0]
        raise ConfigError(f"{origin}: {key} expects {_describe_type(base, key)}; {got}") from None


def load_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated RunConfig from a preset name or YAML path and `key=value` overrides."""
    schema = OmegaConf.structured(RunConfig)
    path = _resolve_preset(preset)
    try:
        file_cfg = OmegaConf.load(path)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = _merge(schema, file_cfg, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=50")
        key = item.split("=", 1)[0].strip()
        try:
            dot_cfg = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': {str(e).splitlines()[0]}") from None
        cfg = _merge(cfg, dot_cfg, f"override {key}")
    obj: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Semantic checks the type system cannot express."""
    t, m, s = cfg.train, cfg.model, cfg.sync
    _check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.run.name)),
           f"run.name: '{cfg.run.name}' must use letters, digits, '_', '-', '.' only")
    _check(t.steps >= 1, f"train.steps: {t.steps} must be >= 1")
    _check(t.workers >= 1, f"train.workers: {t.workers} must be >= 1")
    _check(1 <= t.min_workers, f"train.min_workers: {t.min_workers} must be >= 1")
    _check(t.min_workers <= t.workers,
           f"train.min_workers: {t.min_workers} must be <= train.workers ({t.workers})")
    _check(t.max_workers == 0 or t.max_workers >= t.workers,
           f"train.max_workers: {t.max_workers} must be 0 (= workers) or >= train.workers ({t.workers})")
    _check(t.seq_len >= 8, f"train.seq_len: {t.seq_len} must be >= 8")
    _check(t.seq_len <= m.block_size,
           f"train.seq_len: {t.seq_len} exceeds model.block_size ({m.block_size}); lower it or raise block_size")
    _check(t.batch_tokens >= t.seq_len,
           f"train.batch_tokens: {t.batch_tokens} must be >= train.seq_len ({t.seq_len})")
    _check(t.lr > 0, f"train.lr: {t.lr} must be > 0")
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio: {t.min_lr_ratio} must be in [0, 1]")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device: '{t.device}' must be auto, cpu or cuda")
    _check(t.dtype in ("float32", "bfloat16"), f"train.dtype: '{t.dtype}' must be float32 or bfloat16")
    _check(t.balance in ("auto", "equal", "throughput"),
           f"train.balance: '{t.balance}' must be auto, equal or throughput")
    _check(t.step_timeout_s > 0, f"train.step_timeout_s: {t.step_timeout_s} must be > 0 (seconds; the watchdog "
                                 "floor, e.g. 60)")
    _check(t.hang_factor > 0, f"train.hang_factor: {t.hang_factor} must be > 0 (e.g. 8: watchdog = 8 x median step)")
    _check(t.collective_timeout_s >= 0, f"train.collective_timeout_s: {t.collective_timeout_s} must be > 0 seconds, "
                                        "or 0 for max(60, 4 x train.step_timeout_s)")
    _check(t.pause_timeout_s > 0, f"train.pause_timeout_s: {t.pause_timeout_s} must be > 0 (seconds to wait below "
                                  "train.min_workers before stopping, e.g. 600)")
    _check(t.start_wait_s >= 0, f"train.start_wait_s: {t.start_wait_s} must be >= 0 (seconds to wait for all "
                                "train.workers; 0 = start at once with those ready)")
    _check(t.eval_every >= 0, f"train.eval_every: {t.eval_every} must be >= 0 (0 = score the held-out set only "
                              "at the end)")
    _check(not cfg.data.val_source or t.eval_tokens >= 1,
           f"train.eval_tokens: {t.eval_tokens} must be >= 1 with data.val_source set "
           f"('{cfg.data.val_source}'); raise it or set data.val_source=null to skip evaluation")
    _check(t.log_every >= 1, f"train.log_every: {t.log_every} must be >= 1")
    _check(t.silent_peer_s >= 0, f"train.silent_peer_s: {t.silent_peer_s} must be >= 0 (seconds without a sign of "
                                 "life before a worker is evicted; 0 = max(10, 5 x median step))")
    _check(t.orphan_timeout_s > 0, f"train.orphan_timeout_s: {t.orphan_timeout_s} must be > 0 (seconds a worker "
                                   "waits for a lost coordinator before exiting)")
    _check(t.coordinator_restarts >= 0, f"train.coordinator_restarts: {t.coordinator_restarts} must be >= 0")
    _check(t.state_codec in ("zstd", "none"),
           f"train.state_codec: '{t.state_codec}' must be zstd (compress a joiner's state, lossless) or none")
    _check(t.state_transfer_timeout_s > 0,
           f"train.state_transfer_timeout_s: {t.state_transfer_timeout_s} must be > 0 (seconds)")
    _check(t.profile_steps >= 1, f"train.profile_steps: {t.profile_steps} must be >= 1")
    _check(t.prefetch_in in ("auto", "process", "thread"),
           f"train.prefetch_in: '{t.prefetch_in}' must be auto, process or thread")
    _check(str(t.compile).lower() in ("auto", "true", "false"),
           f"train.compile: '{t.compile}' must be auto (on for CUDA workers, off on CPU), true or false")
    _check(t.fingerprint_every >= 0,
           f"train.fingerprint_every: {t.fingerprint_every} must be >= 0 (0 = auto: 10 on CUDA, 1 on CPU)")
    _check(t.attention_warm_rows >= 0,
           f"train.attention_warm_rows: {t.attention_warm_rows} must be >= 0 (0 = build attention graphs lazily)")
    _check(m.n_layer >= 1, f"model.n_layer: {m.n_layer} must be >= 1")
    _check(m.n_head >= 1, f"model.n_head: {m.n_head} must be >= 1")
    _check(m.n_embd >= 1, f"model.n_embd: {m.n_embd} must be >= 1")
    _check(m.n_embd % m.n_head == 0,
           f"model.n_embd: {m.n_embd} must be divisible by model.n_head ({m.n_head}); "
           f"e.g. model.n_embd={max(1, m.n_embd // m.n_head) * m.n_head} or an n_head that divides {m.n_embd}")
    _check(0 <= m.dropout < 1, f"model.dropout: {m.dropout} must be in [0, 1)")
    _check(m.vocab_size == 0 or m.vocab_size % 64 == 0,
           f"model.vocab_size: {m.vocab_size} must be 0 (auto) or a multiple of 64 (DCT chunks)")
    bad_sync = sync_option_problem(s)  # compression owns its options' ranges
    _check(bad_sync is None, bad_sync or "")
    _check(cfg.checkpoint.every >= 0, f"checkpoint.every: {cfg.checkpoint.every} must be >= 0")
    _check(cfg.checkpoint.keep >= 1, f"checkpoint.keep: {cfg.checkpoint.keep} must be >= 1")
    _check(cfg.checkpoint.write_timeout_s > 0,
           f"checkpoint.write_timeout_s: {cfg.checkpoint.write_timeout_s} must be > 0")
    from datasets.tokenizer import check_tokenizer_name

    bad_tokenizer = check_tokenizer_name(cfg.data.tokenizer)
    _check(bad_tokenizer is None, bad_tokenizer or "")
    _check(cfg.data.max_doc_tokens >= 1, f"data.max_doc_tokens: {cfg.data.max_doc_tokens} must be >= 1")
    _check(cfg.data.retries >= 0, f"data.retries: {cfg.data.retries} must be >= 0")
    _check(cfg.data.read_timeout_s > 0, f"data.read_timeout_s: {cfg.data.read_timeout_s} must be > 0 (seconds a "
                                        "step may wait for its documents, e.g. 120)")
    _check(cfg.data.retry_backoff_s >= 0, f"data.retry_backoff_s: {cfg.data.retry_backoff_s} must be >= 0 seconds")
    _check(cfg.tracking.flush_s >= 0, f"tracking.flush_s: {cfg.tracking.flush_s} must be >= 0 (0 = every step)")
    _check(cfg.tracking.summary_every >= 0,
           f"tracking.summary_every: {cfg.tracking.summary_every} must be >= 0 (0 = summary.json only at the end)")
    _check(cfg.tracking.wandb.mode in ("", "online", "offline", "disabled"),
           f"tracking.wandb.mode: '{cfg.tracking.wandb.mode}' must be online, offline, disabled or empty")
    _check(not (t.accelerators and t.device == "cpu"),
           f"train.accelerators: {list(t.accelerators)} names GPU types but train.device=cpu; use train.device=auto "
           "or cuda, or drop train.accelerators")
    _check(not (t.accelerators and t.worker_gpus == 0),
           "train.accelerators: needs GPU workers but train.worker_gpus=0; drop one of them")
    _check(all(re.fullmatch(r"[A-Za-z0-9_.-]+", a) for a in t.accelerators),
           f"train.accelerators: {list(t.accelerators)}: each must be an accelerator type as Ray names it "
           "(accelerator_type:X resources), e.g. H100, A100, L4")
    needs_sim = cfg.chaos.remove_node_at or cfg.chaos.add_node_at
    _check(not needs_sim or bool(cfg.cluster.simulate),
           "chaos.remove_node_at/add_node_at: need a simulated cluster (cluster.simulate=[A100,L4]); "
           "on a real cluster remove nodes with your provider or `ray drain-node`")


def periodic_checkpoint_due(cfg: RunConfig, committed: int) -> bool:
    """Whether the coordinator checkpoints once `committed` steps are committed (`checkpoint.every`)."""
    every = cfg.checkpoint.every
    return bool(every) and committed % every == 0 and committed < cfg.train.steps


def sync_boundary(cfg: RunConfig, step: int) -> bool:
    """Whether step `step` (0-based) must leave replicas' parameters in agreement: the last step and the
    steps a periodic checkpoint follows (diloco makes an outer step there; the others agree anyway)."""
    return step + 1 == cfg.train.steps or periodic_checkpoint_due(cfg, step + 1)


def max_workers(cfg: RunConfig) -> int:
    return cfg.train.max_workers or cfg.train.workers


def collective_timeout_s(cfg: RunConfig) -> float:
    """How long one gloo rendezvous or collective may block before it raises."""
    return cfg.train.collective_timeout_s or max(60.0, 4 * cfg.train.step_timeout_s)


def to_yaml(cfg: RunConfig, redact: bool = True) -> str:
    data = to_dict(cfg, redact=redact)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def to_dict(cfg: RunConfig, redact: bool = True) -> dict:
    data = dataclasses.asdict(cfg)
    return redact_secrets(data) if redact else data


def redact_secrets(data: Any) -> Any:
    """Replace the values of credential keys (storage options: key, secret, token, ...) and the passwords
    inside URLs and connection strings, so they are never shown or saved; everything else is kept as is."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if isinstance(k, str) and is_secret_key(k) and v not in (None, "", {}):
                out[k] = "***"
            else:
                out[k] = redact_secrets(v)
        return out
    if isinstance(data, (list, tuple)):
        return type(data)(redact_secrets(v) for v in data)
    if isinstance(data, str):
        return redact_value(data)
    return copy.copy(data)


def describe_options() -> list[tuple[str, str, str]]:
    """(key, type, default) for every option, in schema order; used by `train --help`."""
    rows: list[tuple[str, str, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                tname = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                rows.append((key, str(tname), repr(value)))

    walk(RunConfig(), "")
    return rows


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run.dir).expanduser().resolve() / cfg.run.name


def checkpoint_uri(cfg: RunConfig) -> str:
    return cfg.checkpoint.dir or str(run_dir(cfg) / "checkpoints")

