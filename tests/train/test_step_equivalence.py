"""The training step's loss and gradients do not depend on how a batch is laid out or where its image
features come from, for every model family (tiny real models, fp32, CPU):

1. packed rows (several documents per row: block-diagonal mask, or per-document "varlen" attention;
   positions reset per document, Qwen MRoPE per document) give the same loss and gradients as one
   padded row per sample;
2. frames shared between samples run through the vision tower once (counted by a forward hook), and
   the loss equals the one of ``collate_rows(..., dedup=False)`` (one frame per image slot);
3. a feature cache gives the same loss cold (every frame encoded and stored) and warm (every frame read
   back from disk), equal to the no-cache loss on features rounded through the store dtype; in split
   mode (vision features cached, projector trained) the projector gradients equal the no-cache run's;
4. a micro-batch without frames trains on its text alone, with or without a cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vlmtrain.config import ModelConfig
from vlmtrain.data.loader import Batch, collate_rows
from vlmtrain.data.samples import TokenizedSample, VLNSample, decision_turns
from vlmtrain.features.cache import STORE_DTYPES, FeatureCache, fingerprint_modules
from vlmtrain.features.source import FeatureSource, dummy_frame_features
from vlmtrain.models.composed import build_composed_vlm
from vlmtrain.models.composed_chat import tokenizer_from_conversations
from vlmtrain.models.protocol import IGNORE_INDEX, Turn
from vlmtrain.models.registry import load_adapter
from vlmtrain.models.tiny_idefics3 import save_tiny_idefics3
from vlmtrain.models.tiny_llava import save_tiny_llava
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.models.packed_attention import enable_varlen_attention, language_model_configs
from vlmtrain.features.fingerprint import frame_keys
from vlmtrain.models.packed_attention import packed_attention
from vlmtrain.train.step import lm_loss, micro_loss, prepare_batch

CPU = torch.device("cpu")
FAMILIES = ["composed-llama", "composed-qwen3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "llava"]
LOSS_TOL = dict(rtol=0, atol=1e-5)
# fp32 sums in another order (longer packed rows, fewer frames per encoder call): observed max abs
# gradient differences are ~2e-7 against gradients up to ~1, so 1e-5 leaves a wide margin while a
# leaked document or a wrong position moves the loss by far more (the control in test 1).
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
PACKED_ROWS = [[0, 1], [2, 3, 4]]  # 5 samples in 2 packed rows
# HF samples: (conversation, frame ids). Frames 0 and 1 are each shown by two samples; sample 2 is text only.
HF_SAMPLES = [
    ([Turn("user", "<image> where is the door?"), Turn("assistant", "turn left")], (0,)),
    ([Turn("user", "<image><image> go to the red door"), Turn("assistant", "forward")], (1, 0)),
    ([Turn("user", "say hi"), Turn("assistant", "hi there friend")], ()),
    ([Turn("user", "history <image> now <image> find the chair"), Turn("assistant", "stop")], (2, 1)),
    ([Turn("user", "<image> and?"), Turn("assistant", "left then forward")], (3,)),
]
# Composed (VLN decision samples: history frames, then the current one; every sample shows a frame).
VLN_SAMPLES = [VLNSample(0, 0, "go to the red box", (0,), 1), VLNSample(0, 2, "go to the red box", (0, 1, 2), 2),
               VLNSample(1, 1, "find the blue chair", (3, 4), 0), VLNSample(0, 3, "go to the red box", (1, 2), 3),
               VLNSample(1, 0, "find the blue chair", (4,), 1)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@dataclass
class Case:
    """A model in eval mode (no dropout) with samples tokenised by its own format and a frame store."""

    name: str
    model: nn.Module
    samples: list[TokenizedSample]
    frames: torch.Tensor  # (N, 3, H, W) uint8
    pad_id: int
    image_id: int


def _composed(lm_arch: str) -> Case:
    conversations = [list(decision_turns(s.instruction, len(s.frames) - 1, s.target)) for s in VLN_SAMPLES]
    tok = tokenizer_from_conversations(conversations, vocab_size=96)
    mcfg = ModelConfig(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64, patch_size=8,
                       pixel_shuffle=2, lm_arch=lm_arch, lm_hidden=32, lm_layers=2, lm_heads=2, lm_kv_heads=2,
                       lm_intermediate=64, max_position=256)
    torch.manual_seed(0)
    model = build_composed_vlm(mcfg, 32, tok, max_frame_slots=3)
    # A large init (as tiny_qwen's) so that wrong features, slots or ages move the loss far beyond the
    # tolerances; the frame-age table starts at zero otherwise.
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=0.2)
    samples = []
    for turns, s in zip(conversations, VLN_SAMPLES):  # the data path's tokenisation (data/dataset.py)
        enc = model.encode_conversation(turns)
        samples.append(TokenizedSample(enc.input_ids, enc.labels, s.frames))
    return Case(f"composed-{lm_arch}", model.eval(), samples, _random_frames(5, 32, 32), tok.pad_token_id,
                model.image_token_id)


def _hf(family: str, tmp) -> Case:
    if family.startswith("qwen"):
        path, size = save_tiny_qwen_vl(tmp / family, family=family, seed=0), 16  # 4 merged tokens per frame
    elif family == "idefics3":
        path, size = save_tiny_idefics3(tmp / family, seed=0), None
    else:
        path, size = save_tiny_llava(tmp / family, seed=0), None
    model = load_adapter(family, path, size).eval()
    samples = []
    for turns, frames in HF_SAMPLES:
        enc = model.encode_conversation(turns)
        assert enc.num_images == len(frames)
        samples.append(TokenizedSample(enc.input_ids, enc.labels, frames))
    return Case(family, model, samples, _random_frames(4, *model.frame_size), model.tokenizer.pad_token_id or 0,
                model.image_token_id)


def _random_frames(n: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory) -> Case:
    name = request.param
    c = _composed(name.split("-")[1]) if name.startswith("composed") else _hf(name, tmp_path_factory.mktemp(name))
    # Packed collation drops each document's first label; prompts are unlabelled, so the label sets of
    # the padded and packed layouts are the same.
    assert all(s.labels[0] == IGNORE_INDEX for s in c.samples)
    assert len({len(s.input_ids) for s in c.samples}) == len(c.samples)  # all lengths differ
    return c


def _collate(case: Case, packed: bool, dedup: bool = True) -> Batch:
    rows = [[case.samples[i] for i in row] for row in PACKED_ROWS] if packed else [[s] for s in case.samples]
    return collate_rows(rows, case.frames, case.pad_id, case.image_id, packed=packed, dedup=dedup)


def _step(model: nn.Module, batch: Batch, source: FeatureSource, prepare: bool = True):
    """(loss, {name: grad}, frames encoded) of one micro-batch, as the training step runs it."""
    model.zero_grad(set_to_none=True)
    if source.uses_cache and batch.frame_keys is None:  # what StepBuilder(frame_keys=True) adds
        batch.frame_keys = frame_keys(batch.pixels)
    if prepare:
        prepare_batch(model, batch, source)
    loss, encoded = micro_loss(model, batch, CPU, source)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, encoded


def _assert_same_grads(got: dict, expected: dict, names=None) -> None:
    names = sorted(expected) if names is None else names
    assert names and set(names) <= set(got)
    for n in names:
        torch.testing.assert_close(got[n], expected[n], **GRAD_TOL, msg=lambda m: f"{n}: {m}")


def test_packed_loss_and_grads_equal_padded(case):
    padded, packed = _collate(case, packed=False), _collate(case, packed=True)
    assert padded.input_ids.shape[0] == 5 and packed.input_ids.shape[0] == 2 and packed.packed
    assert torch.equal(padded.labels[padded.labels != IGNORE_INDEX], packed.labels[packed.labels != IGNORE_INDEX])
    ref_loss, ref_grads, _ = _step(case.model, padded, FeatureSource())
    loss, grads, _ = _step(case.model, packed, FeatureSource())
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    assert set(grads) == set(ref_grads)
    _assert_same_grads(grads, ref_grads)
    # A batch that skipped the loader thread (prepared inside the step) gives the same loss.
    torch.testing.assert_close(_step(case.model, _collate(case, packed=True), FeatureSource(), prepare=False)[0],
                               ref_loss, **LOSS_TOL)
    # Control: the same packed rows read as plain rows (documents attend to each other, positions run
    # on across documents) change the loss, so the equality above is not a tolerance artefact.
    leaky = _collate(case, packed=True)
    leaky.packed = False
    assert abs(float(_step(case.model, leaky, FeatureSource())[0] - ref_loss)) > 1e-3
    # Per-document ("varlen") attention instead of the (B, 1, L, L) mask: same loss and gradients.
    with varlen_attention(case.model):
        batch = _collate(case, packed=True)
        mask, _ = packed_attention(case.model, batch.doc_lengths, batch.input_ids.shape[1], torch.float32, CPU)
        assert mask is None  # no mask: the varlen path
        loss, grads, _ = _step(case.model, batch, FeatureSource())
        # All five documents in one row (StepBuilder(one_row=True), the varlen default): no padding at
        # all, and still the padded batch's loss and gradients.
        one = collate_rows([case.samples], case.frames, case.pad_id, case.image_id, packed=True)
        assert one.input_ids.shape == (1, sum(len(s.input_ids) for s in case.samples))
        one_loss, one_grads, _ = _step(case.model, one, FeatureSource())
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    _assert_same_grads(grads, ref_grads)
    torch.testing.assert_close(one_loss, ref_loss, **LOSS_TOL)
    _assert_same_grads(one_grads, ref_grads)


@contextlib.contextmanager
def varlen_attention(model: nn.Module):
    """``enable_varlen_attention`` for the duration of the block (the model fixture is shared)."""
    configs = language_model_configs(model)
    before = [c._attn_implementation for c in configs]
    assert enable_varlen_attention(model) == len(configs) > 0
    try:
        yield
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl
        model.varlen_attention = False


class FrameCounter:
    """Frames per call of the vision tower, from a forward hook (Qwen towers take flattened patches
    with one ``grid_thw`` row per frame; the others take ``pixel_values`` (N, 3, H, W))."""

    def __init__(self, model: nn.Module):
        self.calls: list[int] = []
        tower = model.feature_producers(False)[0]
        self.handle = tower.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        frames = kwargs["grid_thw"] if "grid_thw" in kwargs else kwargs["pixel_values"]
        self.calls.append(int(frames.shape[0]))


def test_shared_frames_encoded_once(case):
    frame_ids = [f for s in case.samples for f in s.frames]
    n_unique, n_slots = len(set(frame_ids)), len(frame_ids)
    assert n_unique < n_slots
    counter = FrameCounter(case.model)
    try:
        loss, grads, encoded = _step(case.model, _collate(case, packed=True), FeatureSource())
        assert counter.calls == [n_unique] and encoded == n_unique
        naive = _collate(case, packed=True, dedup=False)
        naive_loss, naive_grads, naive_encoded = _step(case.model, naive, FeatureSource())
        assert counter.calls == [n_unique, n_slots] and naive_encoded == n_slots
    finally:
        counter.handle.remove()
    torch.testing.assert_close(loss, naive_loss, **LOSS_TOL)
    # What an episode-grouped step relies on: a frame shared by several samples of the step, encoded
    # once, gets the gradients of all its slots (vision parameters included).
    _assert_same_grads(grads, naive_grads)
    # Control: slots filled from the wrong frames change the loss (the frames matter to it).
    wrong = _collate(case, packed=True)
    wrong.slot_frames = wrong.slot_frames.roll(1)
    assert abs(float(_step(case.model, wrong, FeatureSource())[0] - loss)) > 1e-3


class RoundedSource(FeatureSource):
    """No cache: every unique frame through the encoder on each step, the cached quantity (vision
    features when ``split``, else visual tokens) rounded through the store dtype as the cache stores
    it. Gradients flow through everything: this is the no-cache run the cached runs must match."""

    def __init__(self, dtype: str, split: bool):
        super().__init__()
        self.store, self.split_ref = STORE_DTYPES[dtype], split

    def features(self, model, batch, device):
        frames = batch.frames.to(device)  # prepare() (no cache) preprocessed every frame
        if self.split_ref:
            return model.project(model.encode_vision(frames).to(self.store).float()), int(batch.pixels.shape[0])
        return model.encode_images(frames).to(self.store).float(), int(batch.pixels.shape[0])


def _open_cache(model: nn.Module, root, dtype: str, split: bool) -> FeatureCache:
    # As ``open_feature_source`` builds it, without its trained-parts check (every weight trains here).
    preprocess = dict(model.feature_preprocess(), producer="vision" if split else "vision+projector")
    return FeatureCache(root, fingerprint_modules(*model.feature_producers(split)), preprocess, dtype=dtype)


@pytest.mark.parametrize("split", [False, True], ids=["features", "split"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cached_equals_recomputed_rounded(case, dtype, split, tmp_path):
    if split and not case.model.supports_split:
        pytest.skip(f"{case.name}: vision tower and projector are not split")
    n_unique = len({f for s in case.samples for f in s.frames})
    ref_loss, ref_grads, _ = _step(case.model, _collate(case, packed=True), RoundedSource(dtype, split))
    raw_loss = _step(case.model, _collate(case, packed=True), FeatureSource())[0]
    assert not torch.equal(raw_loss, ref_loss)  # the rounding is visible in the loss

    runs = []
    for _ in ("cold", "warm"):  # the warm pass reopens the directory: every feature comes from disk
        cache = _open_cache(case.model, tmp_path / "cache", dtype, split)
        source = FeatureSource(cache, split=split)
        runs.append((*_step(case.model, _collate(case, packed=True), source), source.stats()))
        source.close()
    (cold_loss, cold_grads, cold_n, cold_stats), (warm_loss, warm_grads, warm_n, warm_stats) = runs
    assert (cold_n, cold_stats["hit_rate"], cold_stats["misses"]) == (n_unique, 0.0, n_unique)
    assert (warm_n, warm_stats["hit_rate"], warm_stats["hits"]) == (0, 1.0, n_unique)
    assert torch.equal(cold_loss, warm_loss)
    # The same arithmetic on the same rounded features: bitwise equal, and not equal to the raw loss.
    assert torch.equal(cold_loss, ref_loss)
    assert cold_grads.keys() == warm_grads.keys()
    for n in cold_grads:
        assert torch.equal(cold_grads[n], warm_grads[n]), n
    # The cached producers get no gradient; in split mode the projector does, equal to the no-cache run's.
    params = {id(p): n for n, p in case.model.named_parameters()}
    vision_and_projector = [{params[id(p)] for p in m.parameters()} for m in case.model.feature_producers(False)]
    cached = set().union(*vision_and_projector[:1 if split else None])
    assert cached and not cached & cold_grads.keys()
    _assert_same_grads(cold_grads, ref_grads, names=sorted(cold_grads))
    if split:
        projector = vision_and_projector[1]
        assert projector <= cold_grads.keys() and any(float(cold_grads[n].abs().max()) > 0 for n in projector)


def _text_only_sample(case: Case) -> TokenizedSample:
    """A sample without frames: the case's own text-only sample, or (composed VLN samples all show
    frames) the first sample with its image tokens dropped."""
    found = [s for s in case.samples if not s.frames]
    if found:
        return found[0]
    s = case.samples[0]
    keep = [i for i, t in enumerate(s.input_ids) if t != case.image_id]
    return TokenizedSample([s.input_ids[i] for i in keep], [s.labels[i] for i in keep], ())


def test_micro_batch_without_frames(case, tmp_path):
    """One process, a micro-batch without any frame: no crash (SigLIP cannot encode 0 frames), a finite
    loss equal bitwise to the text alone (features of no frame), the tower run once on one black
    frame whose features no slot uses, 0 frames counted, and a zero gradient on every image parameter
    a micro-batch with frames trains (the same graph: ``features/source.py``). With a feature cache
    the same, and nothing is stored."""
    batch = collate_rows([[_text_only_sample(case)]], case.frames, case.pad_id, case.image_id)
    assert batch.pixels.shape[0] == 0 and batch.slot_frames.numel() == 0
    counter = FrameCounter(case.model)
    try:
        loss, grads, encoded = _step(case.model, batch, FeatureSource())
    finally:
        counter.handle.remove()
    assert torch.isfinite(loss) and encoded == 0 and counter.calls == [1]
    dummy = dummy_frame_features(case.model, CPU).detach()
    assert torch.equal(loss, lm_loss(case.model, batch, dummy[:0], CPU).detach())
    # The image parameters a micro-batch with frames trains (not all: LLaVA reads the penultimate layer).
    image = lambda names: {n for n in names if case.model.part_of(n) in ("vision", "projector")}  # noqa: E731
    with_frames = image(_step(case.model, _collate(case, packed=False), FeatureSource())[1])
    assert with_frames and image(grads) == with_frames
    assert all(float(grads[n].abs().max()) == 0.0 for n in with_frames)
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if case.model.part_of(n) == "llm")

    source = FeatureSource(_open_cache(case.model, tmp_path / "cache", "bf16", False))
    cached_loss, _, cached_encoded = _step(case.model, collate_rows([[_text_only_sample(case)]], case.frames,
                                                                    case.pad_id, case.image_id), source)
    assert torch.equal(cached_loss, loss) and cached_encoded == 0 and source.stats()["entries"] == 0
    source.close()
