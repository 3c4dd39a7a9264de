"""The ``Not comparable:`` checks of ``vlmtrain compare``: settings that make two runs measure
different things (model, data sources, global batch, precision, history frames, image size)."""

from __future__ import annotations

from typing import Any, Callable

from vlmtrain.config import RunConfig, SourceConfig, source_name_and_percent
from vlmtrain.tools.compare_inputs import Column

__all__ = ["not_comparable", "sources_text"]

# Keys that size the composed model (an HF family's size is its model.path).
_COMPOSED_SIZE = ("vision_hidden", "vision_layers", "vision_heads", "vision_intermediate", "patch_size",
                  "pixel_shuffle", "lm_arch", "lm_hidden", "lm_layers", "lm_heads", "lm_kv_heads",
                  "lm_intermediate", "vocab_size", "history_tokens", "frame_age_embedding")


def sources_text(sources: list[SourceConfig]) -> str:
    """Source names as a config writes them, ``r2r_125cm_0_30, scalevln_125cm_0_30%50``."""
    names = []
    for i, src in enumerate(sources):
        name, percent = source_name_and_percent(src, f"data.sources[{i}]")
        names.append(name if percent == 100.0 else f"{name}%{percent:g}")
    return ", ".join(names)


def _model_identity(cfg: RunConfig) -> dict[str, Any]:
    m = cfg.model
    keys = ("family", "path") + (_COMPOSED_SIZE if m.family == "composed" else ())
    return {f"model.{k}": getattr(m, k) for k in keys}


def _data_identity(cfg: RunConfig) -> dict[str, Any]:
    # Sources are named: the same names, percents and formats are the same data wherever it lives.
    d = cfg.data
    if d.sources:
        return {"data.sources": sources_text(d.sources),
                "data.sources[].format": ", ".join(s.format for s in d.sources)}
    out = {"data.root": d.root, "data.format": d.format}
    if d.gridnav_episodes:
        out.update({f"data.{k}": getattr(d, k) for k in ("gridnav_episodes", "gridnav_seed", "gridnav_noise",
                                                           "gridnav_detour")})
    return out


def _image_size(cfg: RunConfig) -> dict[str, Any]:
    if cfg.model.family == "composed":
        return {"data.image_size": cfg.data.image_size}
    return {"model.frame_size": cfg.model.frame_size or "the adapter's default"}


_CHECKS: list[tuple[str, Callable[[RunConfig], dict[str, Any]]]] = [
    ("model", _model_identity),
    ("data sources", _data_identity),
    ("global batch", lambda cfg: {"train.batch_size": cfg.train.batch_size}),
    ("precision", lambda cfg: {"train.precision": cfg.train.precision}),
    ("history frames", lambda cfg: {"data.num_history": cfg.data.num_history}),
    ("image size", _image_size),
]


def not_comparable(columns: list[Column]) -> list[str]:
    """One line per check the columns fail, naming the keys and each column's value."""
    out = []
    for title, identity in _CHECKS:
        ids = [identity(c.cfg) for c in columns]
        keys = list(dict.fromkeys(k for i in ids for k in i))
        differing = [k for k in keys if any(i.get(k, "—") != ids[0].get(k, "—") for i in ids[1:])]
        if "data.sources" in differing:  # other names: their formats differ in length too, say it once
            differing = ["data.sources"]
        if differing:
            values = "; ".join(f"{c.label} = " + ", ".join(str(i.get(k, "—")) for k in differing)
                               for c, i in zip(columns, ids))
            out.append(f"different {title} ({', '.join(differing)}): {values}")
    return out
