"""Typed configuration, named presets, and strict ``key=value`` overrides.

A :class:`Config` is a tree of dataclasses. Every field carries a help string (shown by ``dyntrm train --help``
and in error messages). Presets are functions returning a config; a variant derives from its base preset with
:func:`dataclasses.replace`, never by copying it. ``--set model.d_model=256`` is parsed by the field's type, and an
unknown key or a value of the wrong type is an error that lists what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from . import io
from .data.batching import padded

MAX_ANSWER_TOKENS = 2 + 30 * 30 + 29 + 1  # the largest answer: size header, 30 rows of 30, 29 separators, <end>


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help string (tuples are stored as defaults, which is safe: they are immutable)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    source: str = opt("arc1", "arc1, arc2, or a PATH (task directory, task file, or Kaggle challenges file)")
    train_splits: tuple[str, ...] = opt(("train",), "splits whose whole tasks (test pairs too) are trained on")
    demo_splits: tuple[str, ...] = opt((), "splits whose demonstration pairs only are trained on (TRM protocol)")
    eval_split: str = opt("eval", "split whose test inputs are scored; never trained on in full")
    max_side: int = opt(30, "keep only tasks whose grids all fit in max_side x max_side")
    max_len: int = opt(2048, "sequences longer than this are skipped and counted")
    tokens_per_batch: int = opt(16384, "token budget of one (micro-)batch, padding included")
    augment: bool = opt(True, "random dihedral x colour x order view of every task, fresh each epoch")
    repeats: int = opt(1, "views of every training item per epoch")
    curriculum_epochs: int = opt(0, "a curriculum from small grids: epoch e < K trains on the shortest (e + 1) / "
                                    "(K + 1) of its sequences, the rest are left for later epochs (0: off)")
    curriculum: float = opt(0.0, "a curriculum from small grids over the first this fraction of the run (progress "
                                 "as the lr schedule counts it: steps, or time under train.time_budget_s): an epoch "
                                 "trains on the shortest max(progress / curriculum, 0.05) of its sequences and ends "
                                 "early once progress asks for 1.25x that share (0: off)")


@dataclass
class ModelConfig:
    variant: Literal["dyn", "dense", "dynsiha", "dynmoe"] = opt(
        "dyn", "dyn: expert libraries + routers; dense: plain attention and FFN of the same active width (the "
               "ablation baseline); dynsiha: DynSIHA+ attention, dense FFN; dynmoe: dense attention, DynMoE FFN")
    vocab_size: int = opt(48, "embedding rows (the 47 tokens: 10 colours, 7 specials, 30 sizes; padded to 48)")
    d_model: int = opt(128, "width of the residual stream")
    n_heads: int = opt(4, "physical attention heads; d_head = d_model / n_heads")
    max_steps: int = opt(8, "N: recursion steps (training always unrolls all N)")
    attn_experts: int = opt(64, "experts in the global attention library (d_head -> attn_hidden -> d_head)")
    attn_hidden: int = opt(0, "hidden width of an attention expert (0: d_head)")
    attn_shared: bool = opt(True, "DynSIHA+ adds an always-active linear Q/K/V expert over the full width (a "
                                   "shared expert) to the composed Q, K, V")
    attn_init_scale: float = opt(1.0, "RMS of the library's composed Q, K, V at initialisation (1: unit, as the "
                                      "shared path's; smaller: attention starts as the shared linear one and the "
                                      "library grows in)")
    qk_norm: bool = opt(False, "RMS-normalise every head's queries and keys (learned gain per channel) before RoPE")
    attn_active: float = opt(0.0, "target mean number of active attention experts per (token, head, channel); "
                                  "below attn_experts, Q, K, V are composed from the active experts only, the "
                                  "routers held at the target by an L1 controller like DynMoE's (0: attn_experts, "
                                  "dense composition)")
    ffn_experts: int = opt(16, "experts in the global FFN library (d_model -> ffn_mult*d_model -> d_model)")
    ffn_mult: int = opt(4, "FFN expert hidden width as a multiple of d_model")
    ffn_shared: bool = opt(False, "DynMoE adds an always-active shared expert (d_model -> ffn_mult*d_model -> "
                                  "d_model) to the routed ones")
    ffn_active: float = opt(2.0, "target mean number of active FFN experts per token (the sparsity target)")
    halt_threshold: float = opt(0.5, "inference stops a sample once sigmoid(q_halt - q_continue) > this")
    rope_base: float = opt(10000.0, "RoPE base")
    max_positions: int = opt(16384, "RoPE table size: the longest sequence (prompt + answer) the model accepts")
    step_embedding: bool = opt(False, "add a learned per-step embedding before every recursion step")
    input_injection: bool = opt(True, "re-add the input embedding before every recursion step after the first")
    norm_eps: float = opt(1e-6, "RMSNorm epsilon")
    size_header: bool = opt(True, "every grid is preceded by its height and width as two tokens; decoding then "
                                   "writes exactly the shape the model chose first")
    grid_coords: Literal["off", "origin", "borders", "next"] = opt(
        "borders", "learned embeddings of each cell's place in its grid, added to its token embedding (a 2-D signal "
               "beside the 1-D RoPE): origin = row and column from the top-left; borders = also from the bottom "
               "and right borders (needs model.size_header, which tells the size before the cells); next = "
               "borders, plus the same four of the cell the token predicts (the one the format puts next)")
    coord_tables: Literal["separate", "shared"] = opt(
        "separate", "model.grid_coords' embeddings: separate = one learned table per coordinate; shared = one table "
                    "of index embeddings for all coordinates, each seen through its own learned d x d map, so that "
                    "index k as a row, a column or a distance to a border differ by one linear map for every k")
    dihedral_cells: bool = opt(True, "every cell of an output grid, and the cell it predicts, is told the colour "
                                      "its pair's input has at the place each of the 8 symmetries of the square "
                                      "maps there (where the output has the shape that symmetry gives), and "
                                      "whether the cell agrees with it: learned embeddings added to its token's "
                                      "(needs model.size_header)")
    pair_embed: bool = opt(False, "a learned embedding of each token's pair, counted back from the query (0), and "
                                  "of its side (input or output grid), added to its token embedding (measured "
                                  "worse on the ladder: BENCHMARKS, rule selection)")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def dyn_attn(self) -> bool:
        """Whether attention is DynSIHA+ (composed from the attention library): variants dyn and dynsiha."""
        return self.variant in ("dyn", "dynsiha")

    @property
    def dyn_ffn(self) -> bool:
        """Whether the FFN is DynMoE (routed over the FFN library): variants dyn and dynmoe."""
        return self.variant in ("dyn", "dynmoe")

    @property
    def attn_sparse(self) -> bool:
        """Whether the attention composition is sparse: DynSIHA+ with ``0 < attn_active < attn_experts``."""
        return self.dyn_attn and 0 < self.attn_active < self.attn_experts

    @property
    def attn_expert_hidden(self) -> int:
        """The hidden width an attention expert has: ``attn_hidden``, or ``d_head`` where that is 0."""
        return self.attn_hidden or self.d_head


@dataclass
class TrainConfig:
    steps: int = opt(2000, "optimizer steps (the schedule's length)")
    time_budget_s: float = opt(0.0, "if > 0: stop after this many seconds; the schedule then follows elapsed time "
                                    "(such runs are not bit-exactly resumable)")
    lr: float = opt(1e-3, "peak learning rate of the computation parameters")
    routing_lr_mult: float = opt(0.1, "routing parameters (prototypes, gates) use lr x this (routers that move as "
                                      "fast as the experts kept DynTRM from learning to copy: BENCHMARKS sanity)")
    weight_decay: float = opt(0.1, "AdamW decay of computation matrices (not norms, biases or routing)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    warmup: int = opt(20, "linear warm-up steps")
    min_lr_ratio: float = opt(0.1, "the cosine schedule ends at lr x this")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    ema_decay: float = opt(0.999, "weight EMA used for evaluation (0: off)")
    accum: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    seed: int = opt(0, "seed of initialisation, data order, augmentation")
    init: str = opt("", "fine-tune: start from this checkpoint's weights (its EMA where it has one; a run directory "
                        "or one checkpoint), with a fresh optimizer and schedule, the data order restarted, and its L1 "
                        "coefficients under the same controller; model.* must be the checkpoint's (\"\": from scratch)")
    deep_supervision: bool = opt(True, "LM loss at every recursion step (mean); false: the last step only")
    grad_steps: int = opt(0, "backpropagate through the last this many recursion steps only; the earlier ones run "
                             "without gradient and without loss (TRM's truncation; 0: all N, full BPTT)")
    structure_weight: float = opt(1.0, "LM-loss weight of the tokens that fix an output's shape (size header, "
                                       "row separators, END) against 1 for its cells")
    change_weight: float = opt(1.0, "LM-loss weight of the output cells whose colour differs from the input's cell "
                                    "at the same place (pairs of one shape: what copying the input gets wrong) "
                                    "against 1 for the other cells")
    first_output_weight: float = opt(1.0, "LM-loss weight of the first demonstration's output (size header, cells, "
                                          "END), which no earlier pair shows the rule of; 0: not trained on")
    act_weight: float = opt(0.5, "weight of the ACT losses (BCE on q_halt and q_continue)")
    act_gamma: float = opt(0.9, "continue target = gamma x max over later steps of halt targets")
    l1_init: float = opt(1e-2, "initial coefficient of the DynMoE L1 sparsity penalty (two-sided: also the "
                               "smallest magnitude it takes); the same for the attention routers' penalty under "
                               "model.attn_active")
    l1_factor: float = opt(1.05, "per step, the L1 coefficient is multiplied or divided by this toward the target "
                                 "(1: a fixed coefficient l1_init, no controller)")
    l1_two_sided: bool = opt(True, "below the target the L1 coefficient may turn negative (magnitude >= l1_init), "
                                   "rewarding activity; false: ReMoE's rule, coefficient >= 0, which cannot "
                                   "raise activity that the main loss has pushed below the target. Off by itself "
                                   "under shaping.meta_only or when the target is the whole library")
    l1_max: float = opt(0.1, "bound on the magnitude of the L1 coefficient (either sign)")
    bf16: bool = opt(True, "bf16 autocast on CUDA (ignored on CPU, which runs fp32)")
    compile: bool = opt(False, "torch.compile the block (CUDA; off on CPU and in tests)")
    checkpoint_steps: bool = opt(False, "activation checkpointing per trained recursion step: keep only each step's "
                                        "input and recompute the step in the backward (less memory, ~1/3 more "
                                        "compute)")
    threads: int = opt(0, "CPU threads (0: torch's default; under torchrun: cores / local processes)")
    log_every: int = opt(10, "steps between metrics lines / progress updates")
    save_every: int = opt(200, "steps between checkpoints (0: only at the end)")
    keep: int = opt(2, "checkpoints kept in the run directory")
    eval_every: int = opt(0, "steps between evaluations on a fixed subset (0: off)")
    eval_tasks: int = opt(16, "test inputs in the in-training evaluation subset")
    max_bad_steps: int = opt(5, "stop after this many consecutive non-finite steps")


@dataclass
class ShapingConfig:
    kind: Literal["sars", "fars", "none"] = opt("sars", "routing shaper: sars (surprise-aware meta loss), fars "
                                                        "(Fisher-aware cost term) or none")
    meta_weight: float = opt(0.1, "SARS: weight of the meta loss (mean routing entropy after goodness shaping)")
    meta_only: bool = opt(False, "SARS: routing parameters learn from the meta loss only (no main-loss gradient; "
                                 "the DynMoE L1 controller then cannot act)")
    token_rate: float = opt(0.25, "SARS: fraction of real tokens per module whose learning cost enters the meta "
                                  "loss (an unbiased estimate; 1 = all)")
    fars_weight: float = opt(0.01, "FARS: weight of the Fisher-aware routing cost term")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)


# ------------------------------------------------------------------------------------------------ presets

def _debug() -> Config:
    """Test-sized: d_model 32, 2 heads, 8 + 4 experts, 3 steps, 6x6 grids."""
    return Config(
        model=ModelConfig(d_model=32, n_heads=2, max_steps=3, attn_experts=8, ffn_experts=4, ffn_mult=2,
                          ffn_active=1.0, max_positions=2048),
        data=DataConfig(max_side=6, max_len=512, tokens_per_batch=2048),
    )


def _tiny() -> Config:
    """The CPU default, the recipe measured on the sanity ladder (BENCHMARKS.md, "sanity", "rule selection";
    docs/DESIGN.md §7): d_model 128, 4 heads, dense attention + DynMoE over 16 FFN experts (``model.variant=dynmoe``:
    DynSIHA+ measured to slow the learning of the in-context rule choice; ``dyn`` restores it, with 16 attention
    experts), N = 2; DynMoE's L1 penalty fixed at ``train.l1_init`` (``l1_factor=1``: no controller, the routers
    choose how many experts a token uses); lr 3e-3 on 2048-token batches. Like every preset it takes the
    ModelConfig defaults of the serialisation and its features: size header, border coordinates, symmetric
    sources (``model.dihedral_cells``: core four 0.400 -> 0.988 on the ladder)."""
    return Config(model=ModelConfig(variant="dynmoe", attn_experts=16, max_steps=2),
                  data=DataConfig(max_len=2048, tokens_per_batch=2048),
                  train=TrainConfig(lr=3e-3, ema_decay=0.99, l1_factor=1.0))


def _base() -> Config:
    """GPU, TRM-sized: d_model 512, 8 heads; trains on the evaluation tasks' demonstrations too (TRM protocol).
    The recipe's variant and L1 rule (dense attention + DynMoE under a fixed L1 penalty; ``model.variant=dyn`` for
    the specification's full DynTRM with its 64-expert attention library), carried over from the CPU ladder.

    65536 tokens per optimizer step as 4 micro-batches of 16384: one micro-batch of 65536 would not fit an 80 GB
    H100 (the peak memory of a 32768-token one: BENCHMARKS.md, section gpu).
    """
    return Config(
        model=ModelConfig(variant="dynmoe", d_model=512, n_heads=8),
        data=DataConfig(max_len=8192, tokens_per_batch=16384, demo_splits=("eval",), eval_split="eval"),
        train=TrainConfig(accum=4, l1_factor=1.0),
    )


PRESETS: dict[str, Callable[[], Config]] = {"debug": _debug, "tiny": _tiny, "base": _base}


def preset(name: str) -> Config:
    """A fresh config of the named preset: ``debug`` (tests), ``tiny`` (CPU default), ``base`` (GPU)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ------------------------------------------------------------------------------------------------ overrides

class ConfigError(ValueError):
    """A bad override or config file: the message names the key and lists what is valid."""


def fields(cfg: Any, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field, Any]]:
    """Flat ``{"section.key": (owner, field, type)}`` over a config tree."""
    out = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(fields(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (cfg, f, hints[f.name])
    return out


def _parse(key: str, text: str, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is Literal:
            if text not in args:
                raise ValueError(f"expected one of {', '.join(map(str, args))}")
            return text
        if origin is tuple:
            parts = [p for p in text.split(",") if p.strip()]
            return tuple(_parse(key, p.strip(), args[0]) for p in parts)
    except ValueError as e:
        raise ConfigError(f"{key}={text!r}: {e}") from None
    raise ConfigError(f"{key}: unsupported type {tp}")


def _check(key: str, value: Any, tp: Any) -> Any:
    """Type-check a value read from a config file (JSON): ints for floats are fine, lists become tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_check(key, v, args[0]) for v in value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: expected {getattr(tp, '__name__', tp)}")
    return value


def _unknown(key: str, valid: dict) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys:\n  " + "\n  ".join(
        f"{k} ({getattr(t, '__name__', t)}): {f.metadata.get('help', '')}" for k, (_, f, t) in valid.items()))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in place and return ``cfg``."""
    valid = fields(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise _unknown(key, valid)
        owner, f, tp = valid[key]
        setattr(owner, f.name, _parse(key, text, tp))
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Keys added after configs were first written, each with the value that means "as before": a config (a run's
# config.json, a checkpoint's) that does not mention one is read with that value, so an older run resumes and
# evaluates as the model it trained; the field's default is what a new run gets.
BEFORE_KEY: dict[str, Any] = {"model.dihedral_cells": False}


def from_dict(d: dict[str, Any]) -> Config:
    """Strictly rebuild a config from :func:`to_dict` output (unknown keys are errors; a key of
    :data:`BEFORE_KEY` that ``d`` does not mention takes its value from there)."""
    cfg = Config()
    valid = fields(cfg)
    if not isinstance(d, dict):
        raise ConfigError(f"expected a JSON object of config sections, got {type(d).__name__}")
    for key, value in BEFORE_KEY.items():
        section, _, name = key.partition(".")
        if isinstance(d.get(section), dict) and name not in d[section]:
            setattr(getattr(cfg, section), name, value)
    sections = {k.partition(".")[0] for k in valid}
    for section, values in d.items():
        if section not in sections:
            raise _unknown(section, valid)
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a JSON object of keys, got {type(values).__name__}")
        for k, v in values.items():
            key = f"{section}.{k}"
            if key not in valid:
                raise _unknown(key, valid)
            owner, f, tp = valid[key]
            setattr(owner, f.name, _check(key, v, tp))
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike) -> Config:
    """A config file (a run's config.json): an unreadable file, invalid JSON or a bad key raises ConfigError."""
    d = io.read_json(path, lambda what: ConfigError(f"{path}: {what}"))
    try:
        return from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True)
class Range:
    """An interval of valid values for a numeric field; NaN and the infinities lie in none."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return (self.lo < v if self.lo_open else self.lo <= v) and (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


OPEN_LO, OPEN_HI = {"lo_open": True}, {"hi_open": True}

# The valid range of every numeric field (a test checks that none is missing). Relations between fields (heads
# that divide the width, a target within the library) are checked in :func:`validate` after these.
RANGES: dict[str, Range] = {
    "model.vocab_size": Range(47),
    "model.d_model": Range(1), "model.n_heads": Range(1), "model.max_steps": Range(1),
    "model.attn_experts": Range(1), "model.attn_hidden": Range(0), "model.attn_active": Range(0),
    "model.attn_init_scale": Range(0),
    "model.ffn_experts": Range(1),
    "model.ffn_mult": Range(1), "model.ffn_active": Range(0, **OPEN_LO), "model.halt_threshold": Range(0, 1),
    "model.rope_base": Range(1, **OPEN_LO), "model.max_positions": Range(1),
    "model.norm_eps": Range(0, 1, lo_open=True, hi_open=True),
    "data.max_side": Range(1, 30), "data.max_len": Range(8), "data.tokens_per_batch": Range(1),
    "data.repeats": Range(1), "data.curriculum_epochs": Range(0),
    "data.curriculum": Range(0, 1),
    "train.steps": Range(1), "train.time_budget_s": Range(0), "train.lr": Range(0, **OPEN_LO),
    "train.routing_lr_mult": Range(0), "train.weight_decay": Range(0), "train.beta1": Range(0, 1, **OPEN_HI),
    "train.beta2": Range(0, 1, **OPEN_HI), "train.warmup": Range(0), "train.min_lr_ratio": Range(0, 1),
    "train.grad_clip": Range(0), "train.ema_decay": Range(0, 1, **OPEN_HI), "train.accum": Range(1),
    "train.seed": Range(0, 2 ** 64, **OPEN_HI),  # torch.manual_seed's range; numpy wants it >= 0
    "train.grad_steps": Range(0), "train.act_weight": Range(0), "train.act_gamma": Range(0, 1),
    "train.structure_weight": Range(0), "train.change_weight": Range(0), "train.first_output_weight": Range(0),
    "train.l1_init": Range(0, **OPEN_LO),  # the controller multiplies it: never 0
    "train.l1_factor": Range(1), "train.l1_max": Range(0, **OPEN_LO), "train.threads": Range(0),
    "train.log_every": Range(1), "train.save_every": Range(0), "train.keep": Range(0), "train.eval_every": Range(0),
    "train.eval_tasks": Range(1), "train.max_bad_steps": Range(1),
    "shaping.meta_weight": Range(0), "shaping.token_rate": Range(0, 1, **OPEN_LO), "shaping.fars_weight": Range(0),
}


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` on the first field out of its range (naming the key, the range and what the
    field is), then on the first relation between fields that does not hold."""
    for key, (owner, f, _) in fields(cfg).items():
        value = getattr(owner, f.name)
        if key in RANGES and value not in RANGES[key]:
            raise ConfigError(f"{key}={value!r}: must be {RANGES[key]} ({f.metadata['help']})")
    m = cfg.model
    if m.d_model % m.n_heads or m.d_head % 2:
        raise ConfigError(f"model.d_model={m.d_model} must split into model.n_heads={m.n_heads} heads of even width")
    if m.ffn_active > m.ffn_experts:
        raise ConfigError(f"model.ffn_active={m.ffn_active} must be in (0, model.ffn_experts={m.ffn_experts}]")
    if m.grid_coords in ("borders", "next") and not m.size_header:
        raise ConfigError(f"model.grid_coords={m.grid_coords} needs model.size_header=true: the distance to the bottom "
                          "and right borders is known before a grid's cells only from its size header")
    if m.dihedral_cells and not m.size_header:
        raise ConfigError("model.dihedral_cells=true needs model.size_header=true: which symmetries fit an output "
                          "grid is known before its cells only from its size header")
    if m.attn_active > m.attn_experts:
        raise ConfigError(f"model.attn_active={m.attn_active} must be in [0, model.attn_experts={m.attn_experts}] "
                          f"(0: every expert, dense composition)")
    if m.max_positions < cfg.data.max_len + MAX_ANSWER_TOKENS:
        raise ConfigError(f"model.max_positions={m.max_positions} must hold a data.max_len={cfg.data.max_len} prompt "
                          f"plus a full 30x30 answer ({MAX_ANSWER_TOKENS} tokens)")
    t = cfg.train
    if t.grad_steps > cfg.model.max_steps:
        raise ConfigError(f"train.grad_steps={t.grad_steps}: must be in 0..model.max_steps={cfg.model.max_steps}")
    if 0 < t.grad_steps < m.max_steps and not m.input_injection:
        raise ConfigError(f"train.grad_steps={t.grad_steps} < model.max_steps={m.max_steps} needs "
                          f"model.input_injection=true: the embeddings enter at step 1 only, which then runs "
                          f"without gradient, so they would never learn")
    if t.l1_max < t.l1_init:
        raise ConfigError(f"train.l1_max={t.l1_max}: must be >= train.l1_init={t.l1_init}")
    d = cfg.data
    if d.curriculum > 0 and d.curriculum_epochs > 0:
        raise ConfigError(f"data.curriculum={d.curriculum} and data.curriculum_epochs={d.curriculum_epochs}: choose "
                          f"one curriculum (a fraction of the run, or a number of epochs)")
    if d.tokens_per_batch < padded(d.max_len):
        raise ConfigError(f"data.tokens_per_batch={d.tokens_per_batch} must be >= data.max_len={d.max_len}")
    if d.eval_split in d.train_splits:
        raise ConfigError(f"data.eval_split={d.eval_split!r} is also in data.train_splits: its test outputs would "
                          f"be trained on; use data.demo_splits for its demonstrations only")
