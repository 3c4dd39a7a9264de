"""Shared fixtures: tiny GridNav data written once per session; no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Sample indexes of the test runs go to a fresh folder (inherited by torchrun workers), never ~/.cache.
if "VLMTRAIN_INDEX_DIR" not in os.environ:
    import tempfile

    os.environ["VLMTRAIN_INDEX_DIR"] = tempfile.mkdtemp(prefix="vlmtrain-test-index-")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gridnav_root(tmp_path_factory):
    """A 24-episode GridNav training set in the LeRobot layout."""
    from vlmtrain.envs.gridnav.generate import write_dataset

    root = tmp_path_factory.mktemp("gridnav") / "train"
    write_dataset(root, episodes=24, seed=0, split="train")
    return root


@pytest.fixture
def tiny_cfg(gridnav_root, tmp_path):
    """The gridnav_tiny preset pointed at the session dataset and a fresh run directory."""
    from vlmtrain.presets import gridnav_tiny

    cfg = gridnav_tiny()
    cfg.data.root = str(gridnav_root)
    cfg.data.gridnav_episodes = 0
    cfg.output_dir = str(tmp_path / "run")
    cfg.train.progress = False
    return cfg


def _keep_process_torch_settings():
    """Yield, then put back what ``train.threads`` / ``train.deterministic`` switch process-wide: the
    intra-op threads, deterministic algorithms and cuDNN's benchmark / deterministic flags."""
    import torch

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.set_num_threads(before[0])
    torch.use_deterministic_algorithms(before[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


# An in-process ``train`` applies ``train.threads`` / ``train.deterministic`` to the whole process, as a
# run should. These put them back after every test and every module (a module-scoped fixture may train),
# so later tests, and the subprocess runs they compare with, see torch's defaults.
_restore_torch_settings_per_test = pytest.fixture(autouse=True)(_keep_process_torch_settings)
_restore_torch_settings_per_module = pytest.fixture(autouse=True, scope="module")(_keep_process_torch_settings)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's tests, restored afterwards: tiny models gain nothing
    from intra-op threads, and on a busy 2-core machine OpenMP's thread hand-offs made each forward
    ~50x slower (0.5 s instead of 10 ms). Use ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def qwen_lora_config(model_path, gridnav_root, output_dir):
    """A LoRA run of a tiny Qwen2.5-VL on GridNav data (2 history frames, 32 px, batch 8, lr 2e-3),
    shared by the HF training and evaluation tests; each test sets its steps and logging."""
    from vlmtrain.config import RunConfig

    cfg = RunConfig(output_dir=str(output_dir))
    cfg.model.family = "qwen2_5_vl"
    cfg.model.path = str(model_path)
    cfg.model.frame_size = 32
    cfg.model.lora = True
    cfg.data.root = str(gridnav_root)
    cfg.data.gridnav_episodes = 0
    cfg.data.num_history = 2
    cfg.data.load_workers = 1
    cfg.train.batch_size = 8
    cfg.train.ckpt_every = 0
    cfg.train.progress = False
    cfg.optim.lr = 2e-3
    return cfg


@pytest.fixture(scope="session")
def qwen_lora_cfg():
    """:func:`qwen_lora_config` as a fixture (conftest functions are not importable by tests)."""
    return qwen_lora_config


@pytest.fixture(scope="session")
def chat_tokenizer():
    """A tiny composed-model tokenizer (BPE trained on two instructions, the four actions as single
    tokens): what ``models.registry.build_tokenizer`` trains on a run's text, in miniature."""
    from vlmtrain.data.samples import ACTION_TEXTS
    from vlmtrain.models.composed_chat import train_tokenizer

    return train_tokenizer(["go to the red box", "find the blue chair", "walk to the red box and stop"],
                           vocab_size=96, answers=ACTION_TEXTS)


FAMILIES = ["composed", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "llava"]


def tiny_family_model(family: str, tmp, chat_tokenizer):
    """A tiny real model of ``family`` (seed 0): the composed VLM (hidden 32, one layer, pooled history)
    around ``chat_tokenizer``, or the family's tiny HF checkpoint written under ``tmp``."""
    import torch

    from vlmtrain.config import ModelConfig
    from vlmtrain.models.composed import build_composed_vlm
    from vlmtrain.models.registry import load_adapter
    from vlmtrain.models.tiny_idefics3 import save_tiny_idefics3
    from vlmtrain.models.tiny_llava import save_tiny_llava
    from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl

    torch.manual_seed(0)
    if family == "composed":
        mcfg = ModelConfig(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64, lm_hidden=32,
                           lm_layers=1, lm_heads=2, lm_kv_heads=2, lm_intermediate=64, history_tokens=1)
        return build_composed_vlm(mcfg, 32, chat_tokenizer, max_frame_slots=3)
    if family.startswith("qwen"):
        path = save_tiny_qwen_vl(tmp / "hf", family=family, seed=0)
    elif family == "idefics3":
        path = save_tiny_idefics3(tmp / "hf", seed=0)
    else:
        path = save_tiny_llava(tmp / "hf", seed=0)
    return load_adapter(family, path)


@pytest.fixture(scope="session")
def tiny_model_of():
    """:func:`tiny_family_model` as a fixture (conftest functions are not importable by tests)."""
    return tiny_family_model
