"""FLOPs model: counts against real HF modules and torch's own FLOP counter, multipliers, MFU, TGS."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

from vlmtrain.metrics.flops import (
    ATTENTION_MULTIPLIER,
    DENSE_MULTIPLIER,
    count_linear_params,
    mfu,
    part_modes,
    peak_flops,
    step_flops,
    tgs,
)
from vlmtrain.models.shapes import shape_from_hf_config

TINY_LM = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)


def lm_config(arch: str):
    extra = {"head_dim": 16} if arch == "qwen3" else {}  # Qwen3: head_dim != hidden / heads
    return AutoConfig.for_model(arch, tie_word_embeddings=False, **TINY_LM, **extra)


def weight_numel(module: nn.Module, types: tuple[type, ...], skip: tuple[str, ...] = ()) -> int:
    """Weights of all modules of ``types`` whose name contains none of ``skip``."""
    return sum(m.weight.numel() for name, m in module.named_modules()
               if isinstance(m, types) and not any(s in name for s in skip))


def siglip_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, vision_use_head=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_lm_matmul_params_equal_linear_weights(arch):
    cfg = lm_config(arch)
    model = AutoModelForCausalLM.from_config(cfg)
    shape = shape_from_hf_config(cfg)
    assert shape.matmul_params() == weight_numel(model, (nn.Linear,))
    assert shape.head_params() == model.lm_head.weight.numel()
    assert count_linear_params(model) == shape.matmul_params()


def test_siglip_params_equal_linear_and_patch_conv_weights():
    cfg = siglip_config()
    model = SiglipVisionModel(cfg)
    shape = shape_from_hf_config(cfg)
    assert shape.vocab == 0 and shape.head_params() == 0
    assert shape.body_params() == weight_numel(model, (nn.Linear, nn.Conv2d))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vision_params_exclude_the_merger(family):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    common = dict(depth=2, num_heads=4)
    if family == "qwen2_vl":
        vcfg = Qwen2VLConfig(vision_config=dict(embed_dim=32, hidden_size=64, mlp_ratio=2, **common)).vision_config
        model = Qwen2VisionTransformerPretrainedModel._from_config(vcfg)
    elif family == "qwen2_5_vl":
        vcfg = Qwen2_5_VLConfig(vision_config=dict(hidden_size=32, intermediate_size=48, out_hidden_size=64,
                                                   fullatt_block_indexes=[1], **common)).vision_config
        model = Qwen2_5_VisionTransformerPretrainedModel._from_config(vcfg)
    else:
        vcfg = Qwen3VLConfig(vision_config=dict(hidden_size=32, intermediate_size=48, out_hidden_size=64,
                                                deepstack_visual_indexes=[0], **common)).vision_config
        model = Qwen3VLVisionModel._from_config(vcfg)
    shape = shape_from_hf_config(vcfg)
    # The patch merger (and Qwen3's deepstack mergers) are the projector, counted separately.
    assert shape.body_params() == weight_numel(model, (nn.Linear, nn.Conv3d), skip=("merger",))


def test_shape_errors_are_clear():
    composite = AutoConfig.for_model("qwen2_vl")
    with pytest.raises(ValueError, match="text_config"):
        shape_from_hf_config(composite)
    with pytest.raises(ValueError, match="no FLOPs shape rule.*'gpt2'"):
        shape_from_hf_config(AutoConfig.for_model("gpt2"))
    broken = SimpleNamespace(**lm_config("llama").to_dict())
    del broken.intermediate_size
    with pytest.raises(ValueError, match="intermediate_size"):
        shape_from_hf_config(broken)


def counted_flops(model: nn.Module, inputs: dict, backward: bool) -> int:
    """torch's own FLOP count of a forward (and backward) pass."""
    with FlopCounterMode(display=False) as counter:
        out = model(**inputs)
        hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
        if backward:
            hidden.float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["trained", "frozen_backprop", "frozen"])
def test_lm_multipliers_match_torch_flop_counter(mode):
    """6N / 4N / 2N and 3x / 3x / 1x attention, checked against FlopCounterMode on an eager Llama.

    Eager attention computes every score (the causal mask is applied afterwards), so the counter sees
    full attention: compare with ``causal=False``.
    """
    torch.manual_seed(0)
    cfg = lm_config("llama")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    shape = shape_from_hf_config(cfg)
    seq = 11
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    embeds = model.get_input_embeddings()(ids).detach()
    if mode != "trained":
        model.requires_grad_(False)
    if mode == "frozen_backprop":
        embeds.requires_grad_(True)  # something upstream (a projector) wants these grads
    inputs = {"inputs_embeds": embeds}
    expected = (DENSE_MULTIPLIER[mode] * shape.matmul_params() * seq
                + ATTENTION_MULTIPLIER[mode] * shape.attention_flops([seq], causal=False))
    with torch.set_grad_enabled(mode != "frozen"):
        assert counted_flops(model, inputs, backward=mode != "frozen") == expected


def test_vision_forward_matches_torch_flop_counter():
    cfg = siglip_config()
    # Eager attention: torch's counter does not see the CPU SDPA kernel.
    model = SiglipVisionModel._from_config(cfg, attn_implementation="eager").eval()
    shape = shape_from_hf_config(cfg)
    frames, patches = 3, (cfg.image_size // cfg.patch_size) ** 2
    with torch.no_grad():
        got = counted_flops(model, {"pixel_values": torch.randn(frames, 3, 32, 32)}, backward=False)
    expected = 2 * shape.body_params() * patches * frames + shape.attention_flops([patches] * frames, causal=False)
    assert got == expected


def test_step_flops_parts_and_modes():
    lm = shape_from_hf_config(lm_config("llama"))
    vis = shape_from_hf_config(siglip_config())
    docs = [7, 13, 5]
    base = dict(lm_shape=lm, vision_shape=vis, projector_params=1000, lm_doc_lengths=docs,
                vision_patches_per_frame=16, frames_encoded=4, lm_head_positions=sum(docs),
                projector_tokens_per_frame=4)
    out = {m: step_flops(**base, lm_mode=m, vision_mode=m, projector_mode=m) for m in DENSE_MULTIPLIER}
    for part in ("vision_dense", "projector", "lm_dense", "lm_head"):
        assert [out[m][part] for m in ("trained", "frozen_backprop", "frozen", "cached")] == [
            out["frozen"][part] * k // 2 for k in (6, 4, 2, 0)]
    for part in ("vision_attention", "lm_attention"):
        assert [out[m][part] for m in ("trained", "frozen_backprop", "frozen", "cached")] == [
            out["frozen"][part] * k for k in (3, 3, 1, 0)]
    fwd = out["frozen"]
    assert fwd["lm_dense"] == 2 * lm.body_params() * sum(docs)
    assert fwd["lm_head"] == 2 * lm.head_params() * sum(docs)
    assert fwd["projector"] == 2 * 1000 * 4 * 4
    assert fwd["vision_dense"] == 2 * vis.body_params() * 16 * 4
    assert fwd["total"] == sum(fwd[k] for k in ("vision_dense", "vision_attention", "projector", "lm_dense",
                                                "lm_attention", "lm_head"))
    # Cached tower outputs: the tower never runs, a trained projector still runs on the cached features.
    cached = step_flops(**base, lm_mode="trained", vision_mode="cached", projector_mode="trained")
    assert cached["vision"] == 0 and cached["lm"] == out["trained"]["lm"]
    assert cached["projector"] == out["trained"]["projector"] == 6 * 1000 * 4 * 4
    with pytest.raises(ValueError, match="lm_mode"):
        step_flops(**base, lm_mode="train", vision_mode="frozen", projector_mode="frozen")


def test_attention_scales_with_sum_of_squares():
    lm = shape_from_hf_config(lm_config("llama"))
    docs = [100, 300, 50, 150]
    packed = lm.attention_flops(docs, causal=True)
    one_long = lm.attention_flops([sum(docs)], causal=True)
    assert packed < one_long
    assert packed * sum(docs) ** 2 == one_long * sum(n * n for n in docs)
    assert lm.attention_flops([40], causal=False) == 4 * lm.attention_flops([20], causal=False)
    assert lm.attention_flops([40], causal=True) * 2 == lm.attention_flops([40], causal=False)


def test_part_modes_follow_gradient_flow():
    assert part_modes(False, True, True, vision_cached=True) == {
        "vision": "cached", "projector": "trained", "lm": "trained"}
    assert part_modes(True, False, False, vision_cached=False) == {
        "vision": "trained", "projector": "frozen_backprop", "lm": "frozen_backprop"}
    assert part_modes(False, True, False, vision_cached=False)["lm"] == "frozen_backprop"
    assert part_modes(False, False, False, vision_cached=False)["lm"] == "frozen"
    assert part_modes(False, False, False, vision_cached=False, lm_lora=True)["lm"] == "frozen_backprop"
    with pytest.raises(ValueError):
        part_modes(True, True, True, vision_cached=True)


def test_peak_flops_and_mfu():
    assert peak_flops("cpu", torch.bfloat16) is None
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert peak_flops("NVIDIA H100 PCIe", torch.bfloat16) < peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.int8) is None
    assert mfu(1e12, None) is None
    assert mfu(494.5e12, peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16)) == pytest.approx(0.5)


def test_tgs():
    assert tgs(samples_per_s=32.0, mean_seq_len=2048.0, num_gpus=8) == 32 * 2048 / 8
    with pytest.raises(ValueError):
        tgs(1.0, 1.0, 0)
