"""The README's Python examples run as printed, so that a reader who copies one gets no error.

The hub is out of reach here, so the hub id "gpt2" and the placeholder "path/to/hf_gpt2_dir" are
replaced by a local random checkpoint with GPT-2 small's 12 layers and 12 heads (the examples
index layer 9 and head 7), narrow so that the examples run in seconds; n_ctx 128 holds
induction_score's default 2 x 50 + 1 tokens. Nothing else is changed.
"""

import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_small import Transformer, to_tokens

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("readme-hf")
    torch.manual_seed(3)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=48, n_inner=96, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture
def run_block(checkpoint, tmp_path, monkeypatch):
    """Run one README block in a fresh directory holding a train_demo-style run; return its names."""
    monkeypatch.chdir(tmp_path)
    Transformer.from_pretrained(checkpoint).save(tmp_path / "runs" / "train_demo")

    def run(block: str, **names) -> dict:
        for placeholder in ('"gpt2"', '"path/to/hf_gpt2_dir"'):
            block = block.replace(placeholder, repr(str(checkpoint)))
        namespace = dict(names)
        exec(compile(block, f"{README.name} block", "exec"), namespace)  # noqa: S102 (our own README)
        return namespace

    return run


def test_readme_has_the_three_examples():
    blocks = python_blocks()
    assert len(blocks) == 3, f"README.md has {len(blocks)} python blocks; this file runs 3, update it"
    assert "run_with_hooks" in blocks[0] and "beam_search" in blocks[1] and "activation_patching" in blocks[2]


def test_using_it_example(run_block):
    ns = run_block(python_blocks()[0])
    assert ns["tokens"].tolist() == [[15496, 995]]  # as the example's comment says
    assert ns["logits"].shape == (1, 2, 50257)
    assert ns["cache"]["blocks.3.attn.hook_pattern"].shape == (1, 12, 2, 2)
    assert ns["model"].cfg.d_model == 48 and ns["tiny"].cfg.n_layers == 2  # the loaded checkpoint, last
    assert Path("runs/my_model").is_dir()
    assert (Path("runs/my_model_hf") / "config.json").is_file()  # export_hf ran


def test_sampling_example(run_block, capsys):
    ns = run_block(python_blocks()[1])
    prompt = to_tokens("ROMEO:")
    assert ns["tokens"].shape[1] == prompt.shape[1] + 40 and torch.equal(ns["tokens"][:, : prompt.shape[1]], prompt)
    assert capsys.readouterr().out  # the streamed pieces were printed
    assert ns["best"].tokens.shape[0] == 1


def test_interpretability_example(run_block):
    clean = to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = to_tokens("When Mary and John went to the store, Mary gave a drink to")
    mary, john = to_tokens(" Mary")[0, 0], to_tokens(" John")[0, 0]

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    ns = run_block(python_blocks()[2], clean=clean, corrupted=corrupted, metric=metric)
    assert ns["grid"].shape == (12, 12)  # the last call: by head, [n_layers n_heads]
    assert ns["scores"].shape == (12, 12)
    assert ns["cache"]["pattern", 9].shape == (1, 12, clean.shape[1], clean.shape[1])
    assert ns["full"].shape == (12 * 12 + 12 * 96 + 3, 1) and ns["full_labels"][-1] == "bias"
    assert Path("induction.png").stat().st_size > 0
