"""Closed-loop evaluation, one evaluator for every family: ``vlmtrain eval`` on a tiny Qwen2.5-VL LoRA
run writes the same report as on a composed run, and ``VLMPolicy``'s candidate scores equal a one-row
reference forward (log-softmax summed over each answer's tokens) for every family: the HF model's own
forward for the HF families (Qwen3-VL deepstack included), the LM's full logits for the composed model
(pooled history frames, frame-age embedding)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtrain.config import RunConfig, load_config
from vlmtrain.envs.gridnav import simulate
from vlmtrain.envs.gridnav.expert import make_episode
from vlmtrain.data.samples import ACTION_TEXTS, history_indices, user_prompt
from vlmtrain.models.composed import ComposedVLM, build_composed_vlm
from vlmtrain.models.protocol import IGNORE_INDEX, VLM, Turn
from vlmtrain.models.registry import load_adapter
from vlmtrain.models.tiny_idefics3 import save_tiny_idefics3
from vlmtrain.models.tiny_llava import save_tiny_llava
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.train.evaluate import VLMPolicy, evaluate_run, format_report, load_run_model
from vlmtrain.train.loop import train

REPORT_KEYS = {"episodes", "sr", "spl", "ne", "os", "ndtw", "outcomes", "baselines", "split", "seed", "model"}
OUTCOMES = {"success", "out_of_steps", "stopped_at_distractor", "stopped_elsewhere"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def hf_run(gridnav_root, tmp_path_factory, qwen_lora_cfg) -> Path:
    """A finished 4-step LoRA run of a tiny Qwen2.5-VL on the session GridNav data (as in test_train_hf)."""
    tmp = tmp_path_factory.mktemp("hf_eval")
    model = save_tiny_qwen_vl(tmp / "qwen2_5_vl", family="qwen2_5_vl", seed=0)
    cfg = qwen_lora_cfg(model, gridnav_root, tmp / "run")
    cfg.train.steps = 30
    cfg.eval.max_steps = 25  # keeps the rollout short; an untrained policy rarely stops on its own
    train(cfg)
    return Path(cfg.output_dir)


def _states(n_episodes: int, at_calls: tuple[int, ...]) -> list[simulate.EpisodeState]:
    """Copies of live episode states at the given policy calls of an expert rollout (so t differs
    between states and history frames are present)."""
    captured: list[simulate.EpisodeState] = []
    expert = simulate.expert_policy()
    calls = iter(range(10_000))

    def record(states: list[simulate.EpisodeState]) -> list[int]:
        if next(calls) in at_calls:
            captured.extend(copy.deepcopy(states))
        return expert(states)

    simulate.rollout([make_episode(7, "test", i) for i in range(n_episodes)], record, max_steps=max(at_calls) + 1)
    return captured


def _composed_logits(model: ComposedVLM, ids: torch.Tensor, frames, n_slots: int) -> torch.Tensor:
    """Full-vocabulary logits of one row: encoder, ``embed`` (slots in order, ages n-1..0), then the
    LM's own forward and head on every position (not ``forward_lm``'s labelled-only path)."""
    feats = model.encode_images(frames)
    embeds = model.embed(ids, feats, torch.arange(n_slots), torch.arange(n_slots - 1, -1, -1))
    hidden = model.lm.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).last_hidden_state
    return model.lm.lm_head(hidden)


def _reference_scores(adapter: VLM, state: simulate.EpisodeState, num_history: int,
                      prompt: str) -> list[float]:
    """Per action: log P(answer tokens | prompt) from one-row forwards, independently of VLMPolicy.

    Qwen: the HF model's logits (log-softmax summed at the labelled positions); other HF families:
    ``hf_loss`` (HF's own forward and loss, a mean over the row's labelled tokens) times their count;
    composed: the LM's full logits (``_composed_logits``).
    """
    t = len(state.frames) - 1
    shown = history_indices(t, num_history) + [t]
    side = adapter.frame_size[0]
    images = [Image.fromarray(state.frames[i]).resize((side, side), Image.BILINEAR) for i in shown]
    frames = adapter.prepare_frames(torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]))
    text = user_prompt(state.spec.instruction, len(shown) - 1, prompt)
    scores = []
    for answer in ACTION_TEXTS:
        enc = adapter.encode_conversation([Turn("user", text), Turn("assistant", answer)])
        ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
        targets = labels[0, 1:]
        keep = targets != IGNORE_INDEX
        with torch.no_grad():
            if adapter.family == "composed":
                logits = _composed_logits(adapter, ids, frames, len(shown))
                logp = torch.log_softmax(logits[0, :-1].float(), -1)[keep].gather(1, targets[keep, None])
                scores.append(float(logp.sum()))
            elif adapter.family.startswith("qwen"):
                logits = adapter.hf(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    pixel_values=frames.pixels.flatten(0, 1),
                                    image_grid_thw=frames.meta["image_grid_thw"],
                                    mm_token_type_ids=(ids == adapter.image_token_id).int()).logits
                logp = torch.log_softmax(logits[0, :-1].float(), -1)[keep].gather(1, targets[keep, None])
                scores.append(float(logp.sum()))
            else:
                loss = adapter.hf_loss(ids, labels, torch.ones_like(ids), frames)
                scores.append(-float(loss) * int(keep.sum()))
    return scores


def _check_policy(adapter: VLM, num_history: int, prompt: str) -> None:
    # 3 episodes at t=0 (no history) and t=4 (history), so rows of different lengths share a forward;
    # batch_size=4 splits the 6 states into two chunks.
    states = _states(3, (0, 4))
    policy = VLMPolicy(adapter, num_history, prompt, torch.device("cpu"), batch_size=4)
    scores = policy.scores(states)
    expected = torch.tensor([_reference_scores(adapter, s, num_history, prompt) for s in states])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert policy(states) == expected.argmax(-1).tolist()
    # A second call on the same states reads the frames' kept features: the same scores.
    torch.testing.assert_close(policy.scores(states), scores, rtol=0, atol=0)
    assert not torch.allclose(scores[0], scores[-1])  # states differ, and so do their scores


def test_eval_of_hf_run_writes_full_report(hf_run):
    report = evaluate_run(hf_run, episodes=4)
    saved = json.loads((hf_run / "eval.json").read_text())
    assert saved == report
    assert set(report) == REPORT_KEYS and report["episodes"] == 4 and report["split"] == "test"
    for r in (report, report["baselines"]["random"], report["baselines"]["forward"]):
        assert {"episodes", "sr", "spl", "ne", "os", "ndtw", "outcomes"} <= set(r)
        assert set(r["outcomes"]) == OUTCOMES and sum(r["outcomes"].values()) == pytest.approx(1.0)
    assert set(report["baselines"]) == {"random", "forward"}
    text = format_report(report)
    assert "vlmtrain policy" in text and "baseline: forward" in text and "outcomes:" in text


def test_policy_of_hf_run_picks_argmax_of_hf_forward_scores(hf_run):
    cfg = load_config(yaml_path=hf_run / "config.yaml")
    adapter = load_run_model(hf_run / "model", hf_run, cfg)
    assert adapter.frame_size == (32, 32) and not adapter.training
    _check_policy(adapter, cfg.data.num_history, cfg.data.prompt)


@pytest.mark.parametrize("family", ["qwen3_vl", "idefics3", "llava"])
def test_candidate_scores_match_hf_for_other_families(family, tmp_path):
    if family == "qwen3_vl":
        path = save_tiny_qwen_vl(tmp_path / family, family=family, seed=0)
    elif family == "idefics3":
        path = save_tiny_idefics3(tmp_path / family, seed=0)
    else:
        path = save_tiny_llava(tmp_path / family, seed=0)
    adapter = load_adapter("auto", path).eval()
    _check_policy(adapter, num_history=2, prompt=RunConfig().data.prompt)


def test_run_without_model_dir_says_how_to_get_one(hf_run, tmp_path):
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(hf_run / "config.yaml", cut / "config.yaml")  # as an interrupted run leaves it: no model/
    with pytest.raises(FileNotFoundError, match=r"cut/model.*vlmtrain export .*--merged"):
        evaluate_run(cut, episodes=1)
    assert not (cut / "eval.json").exists()


def test_candidate_scores_match_reference_for_the_composed_model(chat_tokenizer, tmp_path):
    mcfg = RunConfig().model
    mcfg.history_tokens = 1  # history frames pooled to one token: the reference must pool them too
    torch.manual_seed(0)
    model = build_composed_vlm(mcfg, 32, chat_tokenizer, max_frame_slots=3)
    torch.nn.init.normal_(model.frame_age.weight, std=0.5)  # ages must reach the scores
    model.save_final(tmp_path / "model")
    again = ComposedVLM.from_pretrained(tmp_path / "model").eval()
    _check_policy(again, num_history=2, prompt=RunConfig().data.prompt)


def test_eval_of_a_run_without_final_model_is_a_one_line_error(tmp_path, capsys):
    from vlmtrain.cli import main as cli_main
    from vlmtrain.config import save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(RunConfig(output_dir=str(run)), run / "config.yaml")
    assert cli_main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no final model to evaluate" in err and "vlmtrain export" in err
