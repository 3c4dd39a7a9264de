"""Typed run configuration: one dataclass per concern, YAML files and ``key=value`` overrides.

Every field carries a docstring-like comment; ``docs/config.md`` lists them. Unknown keys are errors
that name the closest valid key, because a silently ignored typo (``optim.lrr=3e-4``) costs a run.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmtrain.config_parallel import MemoryConfig, ParallelConfig, parallel_problems
from vlmtrain.config_sources import parse_dataset_name, parse_source_spec


# On-disk formats a source can have (readers in vlmtrain/data/formats/, wired in data/sources.py).
DATA_FORMATS = ("lerobot_vln", "internvla_n1", "streamvln", "llava_json", "internvl_meta")
# Model families: the composed model (built from model.*) or an HF checkpoint in model.path.
HF_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "llava")
MODEL_PARTS = ("vision", "projector", "llm")


@dataclass
class SourceConfig:
    """One entry of ``data.sources``: a dataset on disk and its share of the mixture."""

    name: str = ""  # unique label (mixture key, logs); "name%N" sets percent; internvla_n1: the dataset name, e.g. r2r_125cm_0_30
    format: str = "llava_json"  # lerobot_vln, internvla_n1, streamvln, llava_json or internvl_meta
    path: str = ""  # dataset root (VLN formats), annotation file (llava_json) or meta JSON (internvl_meta)
    image_root: str = ""  # llava_json: folder relative image paths are joined to ("": the annotation file's folder)
    percent: float = 100.0  # share kept: <100 subsamples, >100 repeats (seeded, data/mixture.py); internvl_meta: times repeat_time


@dataclass
class DataConfig:
    """Where samples come from and how they are built."""

    root: str = "data/gridnav/train"  # the single source when data.sources is empty: dataset root or annotation file
    format: str = "lerobot_vln"  # format of data.root
    sources: list[SourceConfig] = field(default_factory=list)  # a mixture of sources (see data.sources[] below); empty: data.root
    setting: str = "125cm_0deg"  # camera setting of the rgb frames (<height>cm_<pitch>deg)
    num_history: int = 8  # history frames per decision: unique(linspace(0, t-1, num_history))
    image_size: int = 32  # composed model input resolution (frames are resized once, at load; HF families: model.frame_size)
    prompt: str = "{history} now: {current} {instruction}."  # user turn: {history}, {current} image slots, {instruction}
    max_length: int = 256  # maximum tokens per sample; longer samples are an error, never cut silently
    on_error: str = "raise"  # bad records: raise (stop with file and record) or skip (count per reason)
    gridnav_episodes: int = 0  # >0: generate this many GridNav episodes into `root` when it is absent
    gridnav_seed: int = 0  # seed of the generated GridNav world
    gridnav_noise: float = 0.25  # probability of a random executed action in GridNav demonstrations
    gridnav_detour: float = 0.5  # probability that a GridNav demonstration first detours to a distractor
    load_workers: int = 2  # processes that build the sample index (scene by scene) and decode frames at start-up
    index_dir: str = ""  # where sample indexes live ("": $VLMTRAIN_INDEX_DIR, else ~/.cache/vlmtrain/index); one per source and input fingerprint, built once, reused by every run
    workers: int = 0  # loader processes that decode each step's frames from disk (prefetching, pinned memory on CUDA); 0: decode every frame once at start-up and build steps on a thread
    prefetch_factor: int = 0  # steps each loader process builds ahead (torch DataLoader prefetch_factor; needs data.workers > 0; 0: train/prefetch.py PREFETCH_STEPS, 2)
    persistent_workers: bool = False  # keep the loader processes alive when their pass over the steps ends (DataLoader persistent_workers; needs data.workers > 0; vlmtrain makes one pass per run, so it only changes when they exit)
    packing: bool = True  # pack samples end to end (per-document attention, positions reset per sample; docs/benchmarks.md: faster than padding on every measured shape)
    max_pack_tokens: int = 0  # LLM-token budget of one pack (0: with per-document attention one pack per micro-batch, sized so a step holds train.batch_size samples on average, which depends on world size x grad_accum: set a budget to resume on another world size; else data.max_length)
    max_pack_vision: int = 0  # vision budget of one pack, in encoder patches (0: no vision budget)
    episode_group: int = 0  # >1: this many decisions of one episode (samples sharing frames) together in a step, so their shared frames are encoded once (not with a feature cache); off by default: faster, but it cost GridNav SR 0.645 -> 0.230 (docs/benchmarks.md)
    val_fraction: float = 0.0  # >0: hold out this share of each source's episodes for validation (seeded, by episode: no frame of a held-out episode is trained on)
    val_sources: list[SourceConfig] = field(default_factory=list)  # validation sources, held out whole (instead of data.val_fraction)
    packed_attention: str = "varlen"  # varlen: attention computed per document of a pack | mask: a (B,1,L,L) block-diagonal mask (computes the masked blocks too)
    n1_samples: str = "reference"  # internvla_n1 sources: reference (InternNav's System-2 rules: starts every n1_sample_step frames, pixel-goal / turn / STOP kinds; data/formats/internvla_n1_reference.py) | every_frame (one sample per frame, vlmtrain's earlier rule)
    n1_prompt: str = "reference"  # internvla_n1 sources: reference (InternNav's prompt, system turn and conjunctions) | vlmtrain (vlmtrain's own wording)
    n1_sample_step: int = 4  # internvla_n1 reference rules: frames between two candidate starts (InternNav sample_step)
    n1_future_steps: int = 4  # internvla_n1 reference rules: most actions in a turn answer (InternNav num_future_steps)
    n1_stop_repeat: int = 5  # internvla_n1 reference rules: copies of each instruction's STOP sample
    n1_pixel_goal_only: bool = False  # internvla_n1 reference rules: keep only the pixel-goal samples (InternNav pixel_goal_only)


@dataclass
class FeaturesConfig:
    """The frozen-encoder feature cache (features/cache.py)."""

    cache: str = "auto"  # auto (cache while the feature producer is frozen and the cache fits features.max_gib, else say why not and run without) | on (as auto, but an error when it cannot be used) | off
    cache_dir: str = ""  # cache directory, one per encoder weights + preprocessing ("": output_dir/feature_cache)
    dtype: str = "bf16"  # bf16 | fp16 store precision of cached features
    max_gib: float = 64.0  # largest cache auto/on may fill (also at most 90 % of the free disk); a larger one is refused


@dataclass
class ModelConfig:
    """The model: a pretrained HF VLM from model.path (optionally LoRA) or a composed VLM sized below."""

    family: str = "composed"  # composed (random init, the vision_*/lm_* keys below), qwen2_vl, qwen2_5_vl, qwen3_vl, idefics3 (SmolVLM), llava, or auto (model_type in model.path)
    path: str = ""  # local HF model directory (required unless family=composed; never downloaded)
    frame_size: int = 0  # HF families: square side every frame is resized to (0: the adapter's default)
    lora: bool = False  # HF families: train LoRA adapters; the parts in model.lora_parts then train only through them
    lora_rank: int = 16  # LoRA rank r
    lora_alpha: float = 32.0  # LoRA alpha (the update is scaled by alpha / rank)
    lora_dropout: float = 0.05  # dropout on the LoRA branch input
    lora_targets: list[str] = field(default_factory=list)  # linear-module name suffixes to adapt ([]: attention + MLP of every family, models/lora.py DEFAULT_TARGETS)
    lora_parts: list[str] = field(default_factory=lambda: ["llm", "vision"])  # parts that get LoRA layers: vision, projector, llm
    vision_hidden: int = 96  # SigLIP encoder width
    vision_layers: int = 2  # SigLIP encoder depth
    vision_heads: int = 4  # SigLIP attention heads
    vision_intermediate: int = 384  # SigLIP MLP width
    patch_size: int = 8  # pixels per patch side; tokens per frame = (image_size / patch_size)^2
    pixel_shuffle: int = 2  # projector pixel-shuffle factor; divides tokens per frame by its square
    lm_arch: str = "llama"  # llama | qwen3 (HF config class of the causal LM)
    lm_hidden: int = 128  # LM width
    lm_layers: int = 2  # LM depth
    lm_heads: int = 4  # LM attention heads
    lm_kv_heads: int = 4  # LM key/value heads (GQA when smaller than lm_heads)
    lm_intermediate: int = 512  # LM MLP width
    vocab_size: int = 384  # target vocabulary of the tokenizer trained on the data text
    max_position: int = 1024  # LM maximum position
    frame_age_embedding: bool = True  # add a learned embedding of each frame's slot (oldest..current)
    history_tokens: int = 0  # pool each history frame to this many tokens, a square (0: no pooling)
    spatial_encoder: str = ""  # local HF vision backbone (DINOv2-style AutoModel) run frozen on every frame and fused into its visual tokens, JanusVLN style ("": none; models/spatial.py)
    spatial_projector: str = "mlp"  # linear | mlp: the trainable projector of the spatial features into the LM width
    spatial_weight: float = 0.2  # fusion: visual tokens + spatial_weight x projected spatial features (JanusVLN: 0.2)
    spatial_fusion: str = "add"  # add (after the projector, weighted) | concat (composed model: joins the vision features' channels before its projector, which is built vision_hidden wider)
    spatial_image_size: int = 0  # longest side of the spatial encoder's input, rounded to its patch size (0: its config's image_size)


@dataclass
class OptimConfig:
    """AdamW with per-part learning rates, warmup + cosine decay to a floor."""

    lr: float = 1e-3  # base learning rate (parts without their own rate use it)
    lr_vision: Optional[float] = None  # vision encoder learning rate (None: lr)
    lr_projector: Optional[float] = None  # projector learning rate (None: lr)
    lr_llm: Optional[float] = None  # language model learning rate (None: lr)
    lr_spatial: Optional[float] = None  # spatial projector learning rate (None: lr; model.spatial_encoder)
    weight_decay: float = 0.01  # decoupled weight decay on matrices (not on norms, biases, embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 50  # linear warmup steps (ignored when optim.warmup_ratio > 0)
    warmup_ratio: float = 0.0  # >0: warmup steps = ceil(warmup_ratio x train.steps), e.g. 0.03 as in HF recipes
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of each part's peak rate
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)


@dataclass
class TrainConfig:
    """The loop: length, batch, precision, freezing, logging and checkpoints."""

    steps: int = 1000  # optimizer steps (ignored when train.epochs > 0)
    epochs: float = 0.0  # >0: train this many passes over the planned samples (steps = ceil(epochs x steps per epoch))
    batch_size: int = 128  # samples per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    freeze_vision: bool = False  # do not train the vision encoder
    freeze_projector: bool = False  # do not train the projector
    freeze_llm: bool = False  # do not train the language model
    log_every: int = 10  # steps between metrics.jsonl lines
    ckpt_every: int = 200  # steps between checkpoints (0: only the final one)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest checkpoint in output_dir/checkpoints
    progress: bool = True  # live progress bar on an interactive terminal
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    deterministic: bool = False  # deterministic kernels only (an op without one raises), pinned threads, CUBLAS_WORKSPACE_CONFIG=:4096:8, cuDNN benchmark off; default CPU runs are bitwise reproducible without it (docs/reproducibility.md)
    grad_checkpointing: list[str] = field(default_factory=list)  # parts whose layers recompute activations in backward, e.g. [llm] or [vision, llm]
    record_samples: bool = False  # write the sample ids of every step to samples.jsonl (checks data order and resume)
    best_metric: str = ""  # metric that keeps checkpoints/best, e.g. val/loss or eval/sr ("": none; needs eval.every)
    best_mode: str = "auto"  # min | max | auto (min for a name ending in loss or /ne, else max)
    early_stop_patience: int = 0  # >0: stop after this many validations without a better train.best_metric
    on_nonfinite: str = "skip"  # a NaN/Inf loss or grad norm: skip (no update, counted, warned with the sample ids) | stop (error naming step and samples)


@dataclass
class EvalConfig:
    """Closed-loop GridNav evaluation on held-out layouts."""

    every: int = 0  # steps between validations during training, and at the last step (0: none)
    val_samples: int = 0  # validation samples per validation (0: every held-out sample; else a seeded subset of this size)
    val_batch_size: int = 32  # validation samples per forward
    rollout_episodes: int = 0  # GridNav closed-loop episodes (split "val", seed eval.seed) per validation (0: none)
    episodes: int = 200  # held-out episodes of `vlmtrain eval` (split "test")
    seed: int = 1000  # seed of the held-out episodes
    max_steps: int = 60  # action cap per episode
    batch_size: int = 256  # episodes stepped together (one policy call per step)


@dataclass
class TrackingConfig:
    """Experiment trackers beside metrics.jsonl (rank 0 only; each needs its optional extra)."""

    tensorboard: bool = False  # write TensorBoard event files to output_dir/tensorboard (vlmtrain[tensorboard])
    wandb: bool = False  # log to Weights & Biases (vlmtrain[wandb])
    wandb_project: str = "vlmtrain"  # W&B project
    wandb_run_name: str = ""  # W&B run name ("": the output_dir's folder name)
    wandb_mode: str = "offline"  # W&B mode: offline (files under output_dir/wandb, `wandb sync` later) | online | disabled
    mlflow: bool = False  # log to MLflow (vlmtrain[mlflow])
    mlflow_uri: str = ""  # MLflow tracking URI ("": a local file store, output_dir/mlruns)
    mlflow_experiment: str = "vlmtrain"  # MLflow experiment name


@dataclass
class RunConfig:
    """A whole run."""

    output_dir: str = "runs/default"  # run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/
    seed: int = 0  # seeds model init, data order and every RNG
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class ConfigError(ValueError):
    """A configuration problem the user must fix (unknown key, bad value)."""


def valid_keys(cfg_cls: type = RunConfig, prefix: str = "") -> list[str]:
    """All dotted keys of a config dataclass, e.g. ``optim.lr``."""
    keys = []
    for f in dataclasses.fields(cfg_cls):
        name = prefix + f.name
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            keys.extend(valid_keys(sub, name + "."))
        else:
            keys.append(name)
    return keys


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}`` (lists and scalars are leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_keys(keys: list[str], source: str) -> None:
    known = valid_keys()
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _validate(cfg: RunConfig) -> None:
    choices = {
        "train.precision": (cfg.train.precision, {"fp32", "bf16"}),
        "model.lm_arch": (cfg.model.lm_arch, {"llama", "qwen3"}),
        "model.family": (cfg.model.family, {"composed", "auto", *HF_FAMILIES}),
        "data.on_error": (cfg.data.on_error, {"raise", "skip"}),
        "data.format": (cfg.data.format, set(DATA_FORMATS)),
        "features.cache": (cfg.features.cache, {"off", "auto", "on"}),
        "data.packed_attention": (cfg.data.packed_attention, {"varlen", "mask"}),
        "features.dtype": (cfg.features.dtype, {"bf16", "fp16"}),
        "tracking.wandb_mode": (cfg.tracking.wandb_mode, {"offline", "online", "disabled"}),
        "train.on_nonfinite": (cfg.train.on_nonfinite, {"skip", "stop"}),
        "train.best_mode": (cfg.train.best_mode, {"auto", "min", "max"}),
        "model.spatial_projector": (cfg.model.spatial_projector, {"linear", "mlp"}),
        "data.n1_samples": (cfg.data.n1_samples, {"reference", "every_frame"}),
        "data.n1_prompt": (cfg.data.n1_prompt, {"reference", "vlmtrain"}),
        "model.spatial_fusion": (cfg.model.spatial_fusion, {"add", "concat"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {sorted(allowed)}")
    for field_name in ("{history}", "{current}", "{instruction}"):
        if field_name not in cfg.data.prompt:
            raise ConfigError(f"data.prompt={cfg.data.prompt!r} lacks {field_name}")
    part_lists = {"model.lora_parts": cfg.model.lora_parts, "train.grad_checkpointing": cfg.train.grad_checkpointing,
                  "parallel.fsdp_shard_parts": cfg.parallel.fsdp_shard_parts}
    for key, parts in part_lists.items():
        unknown = sorted(set(parts) - set(MODEL_PARTS))
        if unknown:
            raise ConfigError(f"{key}={list(parts)}: unknown part(s) {unknown}; expected some of {list(MODEL_PARTS)}")
    if cfg.model.spatial_fusion == "concat" and cfg.model.spatial_encoder and cfg.model.family != "composed":
        raise ConfigError(f"model.spatial_fusion=concat: the {cfg.model.family} merger's input width is fixed by its "
                          "pretrained weights; use add (concat: the composed model)")
    for key in ("n1_sample_step", "n1_future_steps", "n1_stop_repeat"):
        if getattr(cfg.data, key) < 1:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)}: must be >= 1")
    if cfg.model.spatial_image_size < 0:
        raise ConfigError(f"model.spatial_image_size={cfg.model.spatial_image_size}: must be >= 0")
    if cfg.model.family == "composed":
        _validate_composed(cfg)
    else:
        _validate_hf(cfg)
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not a multiple of train.grad_accum={cfg.train.grad_accum}"
        )
    positive = {"train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size, "train.log_every": cfg.train.log_every}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value}: must be > 0")
    non_negative = {"data.workers": cfg.data.workers, "data.prefetch_factor": cfg.data.prefetch_factor, "features.max_gib": cfg.features.max_gib,
                    "data.episode_group": cfg.data.episode_group, "data.max_pack_tokens": cfg.data.max_pack_tokens,
                    "train.epochs": cfg.train.epochs, "optim.warmup_steps": cfg.optim.warmup_steps,
                    "data.max_pack_vision": cfg.data.max_pack_vision}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0")
    for key, value in {"data.prefetch_factor": cfg.data.prefetch_factor,
                       "data.persistent_workers": cfg.data.persistent_workers}.items():
        if value and cfg.data.workers <= 0:
            raise ConfigError(f"{key}={value} needs loader processes: set data.workers > 0 "
                              "(data.workers=0 builds steps on a thread)")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio={cfg.optim.warmup_ratio}: must be in [0, 1)")
    _validate_eval(cfg)
    problems = parallel_problems(cfg.parallel, cfg.memory)
    if problems:
        raise ConfigError(problems[0])


def _validate_eval(cfg: RunConfig) -> None:
    """Validation during training (``eval.*``, ``data.val_*``) and the best checkpoint (``train.best_*``)."""
    d, e, t = cfg.data, cfg.eval, cfg.train
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction}: must be in [0, 1)")
    if d.val_fraction > 0 and d.val_sources:
        raise ConfigError("data.val_fraction and data.val_sources both set: hold out part of the training "
                          "sources or name separate validation sources, not both")
    for key, value in {"eval.every": e.every, "eval.val_samples": e.val_samples,
                       "eval.rollout_episodes": e.rollout_episodes, "train.early_stop_patience": t.early_stop_patience}.items():
        if value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0")
    if e.val_batch_size <= 0:
        raise ConfigError(f"eval.val_batch_size={e.val_batch_size}: must be > 0")
    has_val = d.val_fraction > 0 or bool(d.val_sources)
    if e.rollout_episodes and cfg.parallel.backend in ("fsdp2", "deepspeed"):
        raise ConfigError(f"eval.rollout_episodes needs whole weights on every rank (parallel.backend none or ddp), "
                          f"not {cfg.parallel.backend}: validate with data.val_fraction / data.val_sources instead")
    if e.every > 0 and not has_val and not e.rollout_episodes:
        raise ConfigError(f"eval.every={e.every}: nothing to validate on; set data.val_fraction, data.val_sources "
                          "or eval.rollout_episodes")
    if t.best_metric:
        if e.every <= 0:
            raise ConfigError(f"train.best_metric={t.best_metric!r} needs validation during training: set eval.every")
        if t.best_metric.startswith("val/") and not has_val:
            raise ConfigError(f"train.best_metric={t.best_metric!r} needs held-out samples: set data.val_fraction "
                              "or data.val_sources")
        if t.best_metric.startswith("eval/") and not e.rollout_episodes:
            raise ConfigError(f"train.best_metric={t.best_metric!r} needs closed-loop episodes: set eval.rollout_episodes")
        if not t.best_metric.startswith(("val/", "eval/")):
            raise ConfigError(f"train.best_metric={t.best_metric!r}: expected a val/... or eval/... metric "
                              "(e.g. val/loss, val/accuracy, eval/sr, eval/spl)")
    if t.early_stop_patience and not t.best_metric:
        raise ConfigError("train.early_stop_patience needs train.best_metric (the metric that must improve)")


def _validate_composed(cfg: RunConfig) -> None:
    m = cfg.model
    if m.lora:
        raise ConfigError("model.lora=true needs an HF model.family (the composed model trains fully)")
    if cfg.data.image_size % m.patch_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is not a multiple of model.patch_size={m.patch_size}")
    grid = cfg.data.image_size // m.patch_size
    if grid % m.pixel_shuffle:
        raise ConfigError(f"patch grid {grid}x{grid} is not divisible by model.pixel_shuffle={m.pixel_shuffle}")
    if m.history_tokens and round(m.history_tokens**0.5) ** 2 != m.history_tokens:
        raise ConfigError(f"model.history_tokens={m.history_tokens}: must be a square number (pooled grid)")


def _validate_hf(cfg: RunConfig) -> None:
    # Existence of model.path and data paths is checked when the run builds them, so a config can be
    # validated (and shipped as an example) before its model and data exist.
    m = cfg.model
    if not m.path:
        raise ConfigError(f"model.family={m.family} needs model.path (a local HF model directory)")
    if m.frame_size < 0:
        raise ConfigError(f"model.frame_size={m.frame_size}: must be >= 0 (0: the adapter's default)")
    if m.lora_rank <= 0 or m.lora_alpha <= 0 or not 0.0 <= m.lora_dropout < 1.0:
        raise ConfigError(f"model.lora_rank={m.lora_rank}, model.lora_alpha={m.lora_alpha}, "
                          f"model.lora_dropout={m.lora_dropout}: need rank > 0, alpha > 0, 0 <= dropout < 1")
    if m.lora and not m.lora_parts:
        raise ConfigError("model.lora_parts is empty: name the parts that get LoRA layers")
    if not cfg.data.sources and cfg.data.format == "internvla_n1":
        raise ConfigError("data.format=internvla_n1: list the dataset under data.sources, its name "
                          "(e.g. r2r_125cm_0_30) selects the camera settings")
    names = set()
    for i, src in enumerate(cfg.data.sources):
        key = f"data.sources[{i}]"
        name, _ = source_name_and_percent(src, key)
        if src.format not in DATA_FORMATS:
            raise ConfigError(f"{key}.format={src.format!r}: expected one of {list(DATA_FORMATS)}")
        if not src.path:
            raise ConfigError(f"{key}.path is empty")
        if name in names:
            raise ConfigError(f"{key}.name={name!r} is used twice; source names must be unique")
        names.add(name)
        if src.format == "internvla_n1":
            try:
                parse_dataset_name(name)
            except ValueError as e:
                raise ConfigError(f"{key}.name: {e}") from None


def source_name_and_percent(src: SourceConfig, key: str = "data.sources[]") -> tuple[str, float]:
    """A source's name and percent; ``name: r2r%50`` is the same as ``name: r2r, percent: 50``."""
    try:
        name, percent = parse_source_spec(src.name)
    except ValueError as e:
        raise ConfigError(f"{key}.name: {e}") from None
    if "%" in src.name and src.percent != 100.0:
        raise ConfigError(f"{key}: give the percent once, in name ({src.name!r}) or in percent ({src.percent:g})")
    percent = percent if "%" in src.name else src.percent
    if percent < 0:
        raise ConfigError(f"{key}.percent={percent:g}: must be >= 0")
    return name, percent


def _check_source_items(layer: dict, source: str) -> None:
    """Unknown keys inside ``data.sources`` items, with the closest valid key (OmegaConf's own message
    does not say which item)."""
    data = layer.get("data") if isinstance(layer.get("data"), dict) else {}
    known = [f.name for f in dataclasses.fields(SourceConfig)]
    for list_key in ("sources", "val_sources"):
        for i, item in enumerate(data.get(list_key) or []):
            if not isinstance(item, dict):
                raise ConfigError(f"{source}: data.{list_key}[{i}] must be a mapping with keys {known}")
            for key in item:
                if key not in known:
                    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.0)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise ConfigError(f"{source}: unknown key 'data.{list_key}[{i}].{key}'{hint}")


def load_config(
    base: Optional[RunConfig] = None, yaml_path: Optional[str | Path] = None, overrides: Optional[list[str]] = None
) -> RunConfig:
    """Build a RunConfig from a base (a preset or defaults), a YAML file, then ``key=value`` overrides.

    Raises ConfigError naming the source and the closest valid key for any unknown key, and for values
    of the wrong type or outside the allowed choices.
    """
    schema = OmegaConf.structured(base if base is not None else RunConfig())
    layers = []
    if yaml_path is not None:
        text = Path(yaml_path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping at the top level")
        _check_keys(list(flatten(loaded)), str(yaml_path))
        _check_source_items(loaded, str(yaml_path))
        layers.append((str(yaml_path), OmegaConf.create(loaded)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        _check_keys([key], "command line")
        # ``key=`` empties a string (OmegaConf would read it as null, which no str field takes)
        layer = OmegaConf.from_dotlist([item]) if value else OmegaConf.create(_nested(key, ""))
        _check_source_items(OmegaConf.to_container(layer), f"override '{item}'")
        layers.append((f"override '{item}'", layer))
    merged = schema
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {str(e.msg if hasattr(e, 'msg') else e).splitlines()[0]}") from None
    cfg: RunConfig = OmegaConf.to_object(merged)
    _validate(cfg)
    return cfg


def _nested(dotted: str, value) -> dict:
    """``{"a": {"b": value}}`` for ``"a.b"``."""
    out: dict = {}
    node = out
    *parents, last = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return out


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML (what a run writes to ``config.yaml``; ``--config`` reads it back)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the config as YAML."""
    Path(path).write_text(to_yaml(cfg))
