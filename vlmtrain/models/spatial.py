"""A frozen spatial encoder fused into the visual tokens (the JanusVLN recipe), for every family.

JanusVLN adds a second, frozen 3D-geometry encoder to Qwen2.5-VL: it runs on the same frames, its
patch features are projected and added to the visual tokens with weight 0.2. Here that branch is one
module, :class:`SpatialBranch`, attached to any vlmtrain model by :class:`SpatialVLM`:

- **encoder**: a local HF vision backbone (``AutoModel``: DINOv2 with or without registers, SigLIP,
  CLIP vision, ... any model whose ``last_hidden_state`` ends with one token per patch, row-major),
  always frozen and run without gradients, with its own preprocessing (:meth:`SpatialBranch.prepare`:
  the frame resized to a multiple of the encoder's patch size, scaled to [0, 1], normalised with the
  mean / std of the directory's ``preprocessor_config.json``, ImageNet's when it has none);
- **resampling**: its patch grid is resized (bilinear, anti-aliased) to the frame's visual-token grid
  (``VLM.visual_grid``: after the family's merge / pixel shuffle), one feature row per visual token;
- **projector**: trainable, ``linear`` or ``mlp`` (Linear-GELU-Linear) into the LM width;
- **fusion**: ``add``: ``visual + spatial_weight * projector(spatial)`` on the LM-width channels of
  every visual token (Qwen3-VL's deepstack channels are left as they are); ``concat`` (the composed
  model, whose projector is built for it): the spatial features, resampled to the vision encoder's
  patch grid and projected to its width, join the vision features' channels before the pixel-shuffle
  projector (``spatial_weight`` is not used). The HF families' mergers have a fixed input width (their
  pretrained weights), so ``concat`` is refused there.

The encoder output before the projector is what the feature cache stores for the branch
(``features/source.py``), under its own fingerprint and preprocessing, so a warm run never runs the
encoder again whatever the main vision tower does. The encoder is never saved in checkpoints (only
trainable tensors are) nor copied into exports: a saved model holds ``spatial/spatial.json`` (the
encoder's path and fingerprint, the fusion settings) and ``spatial/projector.safetensors``;
:func:`models.registry.load_spatial_model` rebuilds the fused model from them and refuses an encoder whose weights
are not the ones it was trained with.

Not built here: VGGT's aggregator (no installable package with a local ``AutoModel`` directory): it is
refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vlmtrain.models.protocol import FrameBatch

SPATIAL = "spatial"  # the part of the branch's parameters (``models/parts.py``)
SPATIAL_DIR = "spatial"  # inside a saved model directory
SPATIAL_META = "spatial.json"
SPATIAL_WEIGHTS = "projector.safetensors"
PIXELS_KEY = "spatial_pixels"  # the branch's input in ``FrameBatch.meta``
FUSIONS = ("add", "concat")
PROJECTORS = ("linear", "mlp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SpatialConfigError(ValueError):
    """A spatial-encoder setting that cannot be built (one line naming the key)."""


@dataclass(frozen=True)
class SpatialSettings:
    """Everything that rebuilds a branch around its encoder (saved as ``spatial.json``)."""

    encoder_path: str
    projector: str = "mlp"
    weight: float = 0.2
    fusion: str = "add"
    image_size: int = 0  # longest side of the encoder input (0: the encoder config's image_size)
    encoder_fingerprint: str = ""


def _check(s: SpatialSettings) -> None:
    if s.fusion not in FUSIONS:
        raise SpatialConfigError(f"model.spatial_fusion={s.fusion}: expected one of {list(FUSIONS)}")
    if s.projector not in PROJECTORS:
        raise SpatialConfigError(f"model.spatial_projector={s.projector}: expected one of {list(PROJECTORS)}")
    if not math.isfinite(s.weight):
        raise SpatialConfigError(f"model.spatial_weight={s.weight}: must be finite")


def _encoder_config(path: Path):
    from transformers import AutoConfig

    if not path.is_dir():
        raise FileNotFoundError(f"model.spatial_encoder={path}: not a directory (expected a local HF vision "
                                "backbone directory, e.g. DINOv2)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.spatial_encoder={path}: no config.json")
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") == "vggt" or "vggt" in str(raw.get("architectures", "")).lower():
        raise SpatialConfigError(f"model.spatial_encoder={path}: VGGT has no transformers AutoModel "
                                 "implementation; use a DINOv2-style backbone directory")
    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", None) or config


def load_encoder(path: str | Path, weightless: bool = False) -> nn.Module:
    """The frozen encoder in ``path`` (``AutoModel``; a composite config's vision model), in eval mode
    with ``requires_grad`` off; ``weightless``: built from its config on the meta device (``plan``)."""
    from transformers import AutoModel

    path = Path(path)
    config = _encoder_config(path)
    if weightless:
        with torch.device("meta"):
            encoder = AutoModel.from_config(config)
    else:
        encoder = AutoModel.from_pretrained(path, config=config)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


def _norm_stats(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        cfg = json.loads(proc.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(map(float, cfg["image_mean"])), tuple(map(float, cfg["image_std"]))
    return IMAGENET_MEAN, IMAGENET_STD


class SpatialBranch(nn.Module):
    """Frozen encoder -> resampled to the visual-token grid -> trainable projector -> fused (module
    docstring). ``grid``: (rows, cols) of a frame's visual tokens; ``frame_size``: (H, W) of the
    decoded frames; ``out_dim``: the LM width the projector writes."""

    def __init__(self, encoder: nn.Module, settings: SpatialSettings, grid: tuple[int, int],
                 frame_size: tuple[int, int], out_dim: int,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        _check(settings)
        self.encoder = encoder
        self.settings, self.grid, self.frame_size, self.out_dim = settings, tuple(grid), tuple(frame_size), out_dim
        self.mean, self.std = tuple(mean), tuple(std)
        cfg = encoder.config
        self.patch = int(cfg.patch_size)
        side = settings.image_size or int(getattr(cfg, "image_size", 224))
        h, w = self.frame_size
        scale = side / max(h, w)  # the frame's aspect kept; each side a multiple of the patch
        self.input_size = (max(1, round(h * scale / self.patch)) * self.patch,
                           max(1, round(w * scale / self.patch)) * self.patch)
        self.feature_dim = int(cfg.hidden_size)
        if settings.projector == "linear":
            self.projector = nn.Linear(self.feature_dim, out_dim)
        else:
            self.projector = nn.Sequential(nn.Linear(self.feature_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    # -- loader side -----------------------------------------------------------------------------
    def prepare(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames (N, 3, H, W) -> the encoder input (N, 3, h, w), float32, normalised."""
        x = pixels_NCHW.float().div_(255.0)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def identity(self) -> dict[str, Any]:
        """Everything between a decoded frame and a cached spatial feature except the weights (the
        branch cache's preprocessing identity)."""
        return {"encoder": type(self.encoder).__name__, "frame_size": list(self.frame_size),
                "input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "resize": "bicubic-antialias", "grid": list(self.grid), "resample": "bilinear-antialias"}

    # -- inside the step -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, spatial_pixels: torch.Tensor) -> torch.Tensor:
        """Encoder input (N, 3, h, w) -> features on the visual-token grid (N, rows * cols, D_spatial),
        without gradients (the encoder is frozen)."""
        dtype = next(self.encoder.parameters()).dtype
        hidden = self.encoder(pixel_values=spatial_pixels.to(dtype)).last_hidden_state
        ph, pw = self.input_size[0] // self.patch, self.input_size[1] // self.patch
        if hidden.shape[1] < ph * pw:
            raise ValueError(f"spatial encoder: {hidden.shape[1]} tokens for a {ph}x{pw} patch grid")
        patches = hidden[:, hidden.shape[1] - ph * pw:]  # class / register tokens come first
        x = patches.reshape(-1, ph, pw, patches.shape[-1]).permute(0, 3, 1, 2).float()
        if (ph, pw) != self.grid:
            x = F.interpolate(x, size=self.grid, mode="bilinear", antialias=True, align_corners=False)
        return x.flatten(2).transpose(1, 2).contiguous()

    @property
    def concat(self) -> bool:
        """Whether the branch joins the vision features before the model's projector (else: adds to the
        visual tokens after it)."""
        return self.settings.fusion == "concat"

    def fuse(self, visual_NKD: torch.Tensor, spatial_NKS: torch.Tensor) -> torch.Tensor:
        """``add``: ``visual + weight * projector(spatial)`` on the first ``out_dim`` channels of every
        token; ``concat``: ``[vision features | projector(spatial)]`` along the channels."""
        if self.concat:
            projected = self.projector(spatial_NKS.to(self.projector_dtype()))
            return torch.cat([visual_NKD, projected.to(visual_NKD.dtype)], dim=-1)
        added = self.projector(spatial_NKS.to(self.projector_dtype())) * self.settings.weight
        d = self.out_dim
        main = visual_NKD[..., :d] + added.to(visual_NKD.dtype)
        return main if visual_NKD.shape[-1] == d else torch.cat([main, visual_NKD[..., d:]], dim=-1)

    def projector_dtype(self) -> torch.dtype:
        """The projector's parameter dtype (its input is cast to it)."""
        return next(self.projector.parameters()).dtype

    def train(self, mode: bool = True) -> "SpatialBranch":
        """Train mode for the projector; the frozen encoder stays in eval mode (no dropout)."""
        super().train(mode)
        self.encoder.eval()
        return self

    # -- saving ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """``spatial.json`` (settings with the encoder fingerprint, grid, preprocessing) and the
        projector's weights into ``directory`` (the encoder is referenced, not copied)."""
        from vlmtrain.models.fingerprint import fingerprint_modules

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        settings = asdict(self.settings)
        settings["encoder_path"] = str(Path(self.settings.encoder_path).resolve())
        settings["encoder_fingerprint"] = self.settings.encoder_fingerprint or fingerprint_modules(self.encoder)
        meta = {"format": "vlmtrain.spatial/1", "settings": settings, "grid": list(self.grid),
                "frame_size": list(self.frame_size), "out_dim": self.out_dim, "identity": self.identity(),
                "load": "vlmtrain.models.registry.load_spatial_model(model_dir)"}
        (out / SPATIAL_META).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()},
                  str(out / SPATIAL_WEIGHTS))
        return out


def lm_width(model) -> int:
    """Width of the LM's input embeddings (what the visual tokens carry first)."""
    return int(model.output_embeddings().weight.shape[1])


def build_branch(model, settings: SpatialSettings, weightless: bool = False) -> SpatialBranch:
    """A new branch for ``model``: the encoder in ``settings.encoder_path`` (frozen; on the meta device
    when ``weightless``), a freshly initialised projector into the model's LM width."""
    _check(settings)
    path = Path(settings.encoder_path)
    if settings.fusion == "concat":
        width = int(getattr(model, "spatial_concat_width", 0))
        if width <= 0:
            raise SpatialConfigError(f"model.spatial_fusion=concat: the {model.family} projector's input width is "
                                     "fixed (pretrained, or built without the spatial channels); use add")
        grid, out_dim = tuple(model.patch_grid()), width
    else:
        grid, out_dim = tuple(model.visual_grid()), lm_width(model)
    mean, std = _norm_stats(path)
    encoder = load_encoder(path, weightless)
    with torch.device("meta") if weightless else contextlib.nullcontext():
        branch = SpatialBranch(encoder, settings, grid, tuple(model.frame_size), out_dim, mean, std)
    return branch


class SpatialVLM(nn.Module):
    """A vlmtrain model with a :class:`SpatialBranch`: the same protocol (``models/protocol.py``) as
    the model it wraps, whose methods and attributes it passes through, except:

    - ``prepare_frames`` adds the branch's input to the frames' meta (``spatial_pixels``);
    - ``encode_images`` fuses the branch into the wrapped model's visual tokens;
    - ``part_of`` names the branch's parameters ``spatial``;
    - ``save_final`` writes the wrapped model, then ``spatial/`` (:meth:`SpatialBranch.save`).

    The feature source (``features/source.py``) drives ``base`` and ``spatial`` itself, so each half
    can come from its own cache.
    """

    def __init__(self, base: nn.Module, spatial: SpatialBranch):
        super().__init__()
        self.base = base
        self.spatial = spatial

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def prepare_frames(self, pixels_NCHW: torch.Tensor) -> FrameBatch:
        """The wrapped model's frames with the branch's input in ``meta["spatial_pixels"]``."""
        frames = self.base.prepare_frames(pixels_NCHW)
        frames.meta[PIXELS_KEY] = self.spatial.prepare(pixels_NCHW)
        return frames

    def encode_images(self, frames: FrameBatch) -> torch.Tensor:
        """The wrapped model's visual tokens with the spatial features fused in (``concat``: into its
        vision features, before its projector)."""
        spatial = self.spatial.encode(frames.meta[PIXELS_KEY])
        if self.spatial.concat:
            return self.base.project(self.spatial.fuse(self.base.encode_vision(base_frames(frames)), spatial))
        return self.spatial.fuse(self.base.encode_images(base_frames(frames)), spatial)

    def part_of(self, param_name: str) -> str:
        """``spatial`` for the branch's parameters, else the wrapped model's part."""
        names = param_name.split(".")
        for i, c in enumerate(names):
            if c == "spatial":
                return SPATIAL
            if c == "base":
                return self.base.part_of(".".join(names[i + 1:]))
        return self.base.part_of(param_name)

    def train(self, mode: bool = True) -> "SpatialVLM":
        """Train mode for everything but the frozen spatial encoder."""
        super().train(mode)
        self.spatial.train(mode)
        return self

    def save_final(self, directory: str | Path) -> None:
        """The wrapped model's final directory plus ``spatial/`` (encoder reference, projector, fusion)."""
        self.base.save_final(directory)
        self.spatial.save(Path(directory) / SPATIAL_DIR)


def base_frames(frames: FrameBatch) -> FrameBatch:
    """``frames`` without the branch's input (what the wrapped model's encoder takes)."""
    return FrameBatch(frames.pixels, {k: v for k, v in frames.meta.items() if k != PIXELS_KEY})


def spatial_branch(model) -> Optional[SpatialBranch]:
    """The model's spatial branch, or None."""
    return model.spatial if isinstance(model, SpatialVLM) else None


def unfused(model):
    """The model whose ``encode_images`` gives visual tokens without the spatial branch."""
    return model.base if isinstance(model, SpatialVLM) else model


def settings_from_config(mcfg) -> Optional[SpatialSettings]:
    """The branch ``model.spatial_*`` asks for, or None without ``model.spatial_encoder``."""
    if not mcfg.spatial_encoder:
        return None
    return SpatialSettings(mcfg.spatial_encoder, mcfg.spatial_projector, mcfg.spatial_weight,
                           mcfg.spatial_fusion, mcfg.spatial_image_size)


def attach_spatial(model, settings: Optional[SpatialSettings]):
    """``model`` with a new branch (a :class:`SpatialVLM`), or ``model`` itself when ``settings`` is
    None. A model whose weights are on the meta device gets a weightless branch."""
    if settings is None:
        return model
    weightless = any(p.is_meta for p in model.parameters())
    return SpatialVLM(model, build_branch(model, settings, weightless))


def has_saved_branch(directory: str | Path) -> bool:
    """Whether a saved model directory carries a spatial branch."""
    return (Path(directory) / SPATIAL_DIR / SPATIAL_META).is_file()


def load_branch(model, directory: str | Path, encoder_path: Optional[str | Path] = None,
                check_fingerprint: bool = True) -> SpatialVLM:
    """``model`` (the loaded base) with the branch saved in ``directory/spatial``: the encoder from the
    saved path (or ``encoder_path``), which must have the saved fingerprint, and the trained projector."""
    from vlmtrain.models.fingerprint import fingerprint_modules

    root = Path(directory) / SPATIAL_DIR
    meta = json.loads((root / SPATIAL_META).read_text())
    saved = dict(meta["settings"])
    if encoder_path is not None:
        saved["encoder_path"] = str(encoder_path)
    settings = SpatialSettings(**saved)
    branch = build_branch(model, settings)
    if tuple(meta["grid"]) != branch.grid or meta["out_dim"] != branch.out_dim:
        raise SpatialConfigError(f"{root}: saved for a {meta['grid']} grid of width {meta['out_dim']}, but the "
                                 f"model has {list(branch.grid)} / {branch.out_dim}")
    if check_fingerprint:
        found = fingerprint_modules(branch.encoder)
        if found != settings.encoder_fingerprint:
            raise SpatialConfigError(f"{root}: the spatial encoder at {settings.encoder_path} is not the one this "
                                     f"model was trained with (fingerprint {found[:12]} != {settings.encoder_fingerprint[:12]})")
    branch.projector.load_state_dict(load_file(str(root / SPATIAL_WEIGHTS)))
    return SpatialVLM(model, branch)
