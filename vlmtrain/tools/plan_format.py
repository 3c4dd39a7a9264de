"""``vlmtrain plan``'s report (``tools/plan.py``) as plain-text tables."""

from __future__ import annotations

from typing import Sequence

GIB = float(1 << 30)


def human(n: float, unit: str = "") -> str:
    """``1.23M`` style: k / M / G / T / P."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def duration(s: float) -> str:
    """Seconds as ms / s / min / h / d."""
    for limit, scale, unit in ((1e-3, 1e-6, "us"), (1, 1e-3, "ms"), (120, 1, "s"), (7200, 60, "min"),
                               (172800, 3600, "h")):
        if s < limit:
            return f"{s / scale:.{1 if unit in ('us', 'ms', 'min') else 2}f} {unit}"
    return f"{s / 86400:.2f} d"


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2 ** 20:.2f} MiB"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned first column, right-aligned others."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_plan(r: dict) -> str:
    """The whole report as text sections."""
    hw, b, c, d = r["hardware"], r["batch"], r["compute"], r["data"]
    out = [f"vlmtrain plan: {r['config']['family']} ({r['config']['precision']}, backend "
           f"{r['config']['backend']}) on {hw['nodes']} node(s) x {hw['gpus_per_node']} {hw['gpu_name']} "
           f"= {hw['world_size']} rank(s); model built on the {r['config']['model_built_on']}", ""]
    p = r["parameters"]
    out.append(table(["parameters", "total", "trainable", "LoRA"],
                     [[part, human(v["total"]), human(v["trainable"]), human(v["lora"])]
                      for part, v in p.items()]))
    out.append(f"LoRA share: {p['all']['lora_share_of_trainable']:.1%} of trainable, "
               f"{p['all']['lora_share_of_total']:.3%} of all parameters")
    out.append("")
    with_kinds = any("kinds" in s for s in d["sources"].values())  # InternVLA-N1 reference samples
    out.append(table(["source", "available", "percent", "planned"] + (["per kind"] if with_kinds else []),
                     [[n, s["available"], f"{s['percent']:g}%", s["planned"]]
                      + ([", ".join(f"{k} {v}" for k, v in s.get("kinds", {}).items()) or "-"] if with_kinds else [])
                      for n, s in d["sources"].items()]))
    t, im = d["tokens_per_sample"], d["images_per_sample"]
    out.append(f"{d['samples']} samples, {d['frames']} distinct frames; tokens/sample {t['mean']} "
               f"({t['min']}-{t['max']}); images/sample {im['mean']} ({im['min']}-{im['max']})"
               + (f"; skipped {d['skipped']}" if d["skipped"] else ""))
    if d["packing"]:
        k = d["packing"]
        out.append(f"packing: {k['packs']} packs of {k['samples_per_pack']} samples on average "
                   f"({k['token_budget']}-token budget), {k['packs_per_micro_batch']} pack(s) per micro-batch")
    out.append("")
    out.append(f"batch: {b['micro_batch_samples_per_device']} samples per device micro-batch x {b['grad_accum']} "
               f"accumulation x {b['ranks']} rank(s) = {b['samples_per_step']} samples per step "
               f"(train.batch_size={b['global_batch']})")
    out.append(f"steps: {b['steps_per_epoch']} per epoch, {b['total_steps']} in total ({b['epochs']} epochs)")
    out.append(f"compute: {human(c['flops_per_step'], 'FLOP')} per step (mean of {c['steps_counted']} steps, "
               f"{human(c['flops_per_step_min'])}-{human(c['flops_per_step_max'])}), peak "
               f"{human(hw['peak_flops'], 'FLOP/s')} per GPU, MFU {c['mfu']:.3g} ({c['mfu_source']})")
    out.append(f"time: {duration(c['step_s'])} per step, {duration(c['epoch_s'])} per epoch, "
               f"{duration(c['total_s'])} in total")
    out.append("")
    rows = []
    for name, m in r["memory"].items():
        rows.append([name + (" *" if m["configured"] else ""), gib(m["parameters"]), gib(m["gradients"]),
                     gib(m["optimizer"]), gib(m["buffers"]), gib(m["activations_no_checkpointing"]),
                     gib(m["activations_checkpointing"]), gib(m["total"]),
                     gib(m["host"]) if m["host"] else "-", "yes" if m["fits"] else "NO"])
    out.append(table(["memory per rank", "params", "grads", "optimizer", "buffers", "acts", "acts (ckpt)",
                      "total", "host", f"fits {hw['memory_gib']} GiB"], rows))
    out.append("(* the configured backend; total counts the activations as train.grad_checkpointing is set)")
    f = r["feature_cache"]
    out.append(f"feature cache: {'used' if f['used'] else 'not used'} ({f['reason']}); "
               f"{gib(f['disk_bytes'])} on disk for {f['frames']} frames ({f['bytes_per_frame']} B each)"
               + (f", up to {gib(f['disk_bytes_all_ranks'])} with one cache per rank"
                  if f["disk_bytes_all_ranks"] != f["disk_bytes"] else ""))
    if "spatial" in f:
        sp = f["spatial"]
        out.append(f"spatial feature cache: {'used' if sp['used'] else 'not used'}; {gib(sp['disk_bytes'])} on disk "
                   f"({sp['bytes_per_frame']} B per frame)")
    out.append("")
    out.append("assumptions:")
    out += [f"- {a}" for a in r["assumptions"]]
    return "\n".join(out)
