"""TrainConfig: one pretraining / SFT run, read from a TOML run file plus strict `key=value` overrides.

A run file names a model preset and overrides its fields in a `[model]` table; the other tables are the
nested dataclasses below. Every key is checked: an unknown one is an error naming the nearest field.

    preset = "nano"
    steps = 600
    [model]
    num_nextn_predict_layers = 1
    [optim]
    lr = 3e-3
    [data]
    seq_len = 256
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.config import PRESETS, ModelConfig, apply_overrides
from nanoseek.data.builtin import get_mix
from nanoseek.data.loader import LOSS_ON
from nanoseek.kernels import Settings as KernelSettings
from nanoseek.model.fp8 import SCALE_FMTS

SCHEDULES = ("v3", "wsd", "cosine", "constant")
PRECISIONS = ("default", "fp8")
MOMENTS_DTYPES = ("fp32", "bf16")


@dataclass
class OptimConfig:
    """AdamW (DeepSeek-V3 report §4.2: beta 0.9/0.95, weight decay 0.1 on matrices only) and the LR schedule.

    v3:   linear warmup, constant, cosine decay to min_lr_ratio * lr over the last decay_frac of the steps
    wsd:  linear warmup, constant (stable), linear decay to min_lr_ratio * lr over the last decay_frac
    cosine: warmup then cosine over all remaining steps; constant: warmup then constant
    moments_dtype: "bf16" keeps AdamW's m and v in bf16, as V3 (DeepSeek-V3 report §3.3.3); "fp32" torch's AdamW
    """

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "v3"
    decay_frac: float = 0.4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    moments_dtype: str = "fp32"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.moments_dtype not in MOMENTS_DTYPES:
            raise ValueError(f"optim.moments_dtype={self.moments_dtype!r} must be one of {MOMENTS_DTYPES}")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name}={getattr(self, name)!r} must be > 0")
        for name in ("min_lr_ratio", "decay_frac", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"optim.{name}={getattr(self, name)!r} must be in [0, 1]")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")


@dataclass
class DataConfig:
    """path: a shard directory made by `nanoseek prepare` ("" = the built-in reasoning corpus)."""

    path: str = ""
    seq_len: int = 256
    builtin_dir: str = "runs/data/builtin"  # where the built-in corpus, tokenizer and shards are cached
    builtin_vocab_size: int = 2048
    builtin_docs: int = 60000
    builtin_seed: int = 0
    builtin_mix: str = "full"  # "full": every task family; "arithmetic": addition and subtraction (the demo)
    builtin_p_err: float = 0.0  # imitation noise: each add/sub scratchpad step is off by one with this chance
    loss_on: str = "all"  # "assistant": SFT, the loss only on assistant turns of chat documents

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")
        get_mix(self.builtin_mix)
        if not 0 <= self.builtin_p_err < 1:
            raise ValueError(f"data.builtin_p_err={self.builtin_p_err} must be in [0, 1)")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"data.loss_on={self.loss_on!r} must be one of {LOSS_ON}")


@dataclass
class TrainConfig:
    preset: str = "nano"
    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("nano"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "runs/nano"
    init: str = ""  # start from these weights (a run, checkpoint or HF directory) instead of random ones
    steps: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bf16 autocast where the device has fast bf16 (CUDA), else fp32
    # default: every GEMM in `dtype`; fp8: V3's FP8 recipe for the linear layers and experts
    # (nanoseek.model.fp8_linear), the rest in `dtype`; fp8_scale_fmt "ue8m0": power-of-two scales
    precision: str = "default"
    fp8_scale_fmt: str = "fp32"
    # V3 losses (DeepSeek-V3 report §4.2): L = L_main + lambda L_MTP + alpha sum L_Bal
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1  # V3: 0.3 for the first 10T tokens, then 0.1
    mtp_lambda_switch: float = 0.676  # fraction of the steps (10 / 14.8)
    balance_alpha: float = 1e-4
    # auxiliary-loss-free balancing: b_i += gamma sign(mean(c) - c_i) after each optimizer step
    bias_gamma: float = 1e-3
    bias_gamma_late: float = 0.0  # V3: 0.001 for the first 14.3T tokens, then 0
    bias_gamma_switch: float = 0.966  # fraction of the steps (14.3 / 14.8)
    # intervals
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    time_limit: float = 0.0  # seconds of training after which the run ends early (0 = none)
    price_per_hour: float = 2.0  # dollars per device-hour, for report.md
    # under torchrun (nanoseek/parallel): batch_size is the global batch, split over the ranks
    ep: int = 1  # expert-parallel degree: routed experts split over groups of ep ranks (1 = off)
    dist_timeout: float = 600.0  # seconds a collective may wait for the other ranks before the job stops
    # the kernels applied to the model (nanoseek/kernels): config.json records gemm's resolved library
    kernels: KernelSettings = field(default_factory=KernelSettings)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "ckpt_every", "keep_last"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r} must be auto, cpu, cuda or cuda:N")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype={self.dtype!r} must be auto, fp32 or bf16")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.fp8_scale_fmt not in SCALE_FMTS:
            raise ValueError(f"fp8_scale_fmt={self.fp8_scale_fmt!r} must be one of {SCALE_FMTS}")
        for name in ("mtp_lambda", "mtp_lambda_late", "balance_alpha", "bias_gamma", "bias_gamma_late"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not (isinstance(self.ep, int) and self.ep > 0):
            raise ValueError(f"ep={self.ep!r} must be a positive integer (1 = no expert parallelism)")
        if self.ep > 1 and not self.model.has_moe:
            raise ValueError(f"ep={self.ep} needs routed experts, but the model has no MoE layer")
        E = self.model.n_routed_experts
        if E % self.ep:
            raise ValueError(f"ep={self.ep} must divide model.n_routed_experts={E} (each rank of an expert-parallel "
                             f"group holds E/ep experts); allowed: {[d for d in range(1, E + 1) if E % d == 0]}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout={self.dist_timeout!r} must be > 0 seconds")
        if self.precision == "fp8" and self.ep > 1:  # ExpertParallel's local experts have no FP8 path yet
            raise ValueError(f"precision='fp8' with ep={self.ep} is not supported: expert-parallel experts run "
                             f"in high precision; use ep=1 (data parallel) with fp8")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.data.seq_len

    def mtp_weight(self, step: int) -> float:
        return self.mtp_lambda if step < self.mtp_lambda_switch * self.steps else self.mtp_lambda_late

    def gamma(self, step: int) -> float:
        return self.bias_gamma if step < self.bias_gamma_switch * self.steps else self.bias_gamma_late

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        return cls(model=ModelConfig(**d.pop("model")), optim=OptimConfig(**d.pop("optim")),
                   data=DataConfig(**d.pop("data")), kernels=KernelSettings(**d.pop("kernels", {})), **d)


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """TOML run file (optional) + `key=value` overrides (dotted for tables: `optim.lr=1e-3`)."""
    table = read_toml(path, overrides)
    preset = table.pop("preset", "nano")
    for item in overrides:
        if item.startswith("preset="):
            preset = item.split("=", 1)[1]
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown; choose one of {sorted(PRESETS)}")
    cfg = TrainConfig(preset=preset, model=ModelConfig.preset(preset), out_dir=f"runs/{preset}")
    cfg = apply_overrides(cfg, flatten_table(table))
    return apply_overrides(cfg, [o for o in overrides if not o.startswith("preset=")])


def read_toml(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """A TOML run file as a dict ({} for None); errors name the file. Its relative paths to existing
    folders (`PATH_KEYS`) are resolved (`_resolve_paths`) unless a `key=value` override replaces them."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"run config {str(path)!r} does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"run config {str(path)!r} is not valid TOML: {e}") from None
    return _resolve_paths(table, path, {o.split("=", 1)[0].strip() for o in overrides})


PATH_KEYS = ("init", "data.path")  # run-file keys that name folders which must already exist


def _resolve_paths(table: dict, path: Path, skip: set[str]) -> dict:
    """A relative `init` / `data.path` in run file `path` means the folder beside the file when it exists there
    (configs/grpo.toml's init from any directory), else the one in the working directory; neither is an error
    that names both places."""
    for key in PATH_KEYS:
        *heads, last = key.split(".")
        holder = table
        for head in heads:
            holder = holder.get(head) if isinstance(holder, dict) else None
        value = holder.get(last) if isinstance(holder, dict) else None
        if key in skip or not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        beside = path.parent / value
        if beside.exists():
            holder[last] = str(beside)
        elif not Path(value).exists():
            raise ValueError(f"{key} = {value!r} in {path}: a relative path is looked up beside the run file "
                             f"({beside}), then in the working directory ({Path.cwd() / value}); neither exists")
    return table


def flatten_table(table: dict, prefix: str = "") -> list[str]:
    """TOML tables -> dotted key=value strings (values re-encoded as TOML literals)."""
    out = []
    for key, value in table.items():
        if isinstance(value, dict) and not (prefix == "model." and key == "rope_scaling"):
            out += flatten_table(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_toml_literal(value)}")
    return out


def _toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return repr(value)
