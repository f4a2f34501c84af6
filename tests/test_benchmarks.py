"""The benchmark scripts' variant names: each one a GPU session will run is accepted, and a misspelt
or misplaced option is refused before anything runs. The scripts read options by substring, so an
unchecked typo would time the wrong thing under the name asked for, on a GPU lent for minutes.
One run of bench_generate, its smallest, checks that it cleans up; no timing is asserted.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_generate, bench_train

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # a device object only: check_variant reads its type, nothing runs on it


def variants_in_gpu_session(script: str) -> list[str]:
    """The --variants lists that benchmarks/gpu_session.sh passes to `script`."""
    text = (REPO / "benchmarks" / "gpu_session.sh").read_text().replace("\\\n", " ")
    lists = re.findall(rf"{script}\.py[^\n]*?--variants\s+([\w,-]+)", text)
    return [variant for variants in lists for variant in variants.split(",")]


def test_every_training_variant_a_gpu_session_runs_is_accepted():
    named = variants_in_gpu_session("bench_train")
    assert len(named) >= 15  # the parse found gpu_session.sh's lists (measured: 18)
    for variant in named + ",".join(bench_train.DEFAULT_VARIANTS).split(","):
        bench_train.check_variant(variant, CUDA)


def test_every_sampling_variant_a_gpu_session_runs_is_accepted():
    named = variants_in_gpu_session("bench_generate")
    assert {"ours-bf16-compiled", "ours-bf16-cdtuned-compiled", "hf-static-bf16"} <= set(named)
    for variant in named + ",".join(bench_generate.DEFAULT_VARIANTS).split(","):
        bench_generate.check_variant(variant)


@pytest.mark.parametrize(
    "variant, message",
    [
        ("ours-padded-compield", "unknown option -compield"),
        ("ours-padded-padded-compiled", "an option given twice"),
        ("gpt2-compiled", "must start with one of ours, hf, nanogpt"),
        ("ours-padded-graphs", "-graphs applies to compiled variants; add -compiled"),
        ("ours-cdtuned", "-cdtuned applies to compiled variants"),
        ("ours-padded-compiled-graphs-tied", "-graphs comes last, after -compiled"),
        ("hf-padded-tied-compiled", "-tied applies to ours only"),
        ("ours-flash-cudnn-compiled", "pins two attention kernels"),
        ("ours-padded-stepgraph-compiled-graphs", "-stepgraph already replays the whole step"),
    ],
)
def test_a_bad_training_variant_is_refused(variant, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        bench_train.check_variant(variant, CUDA)


def test_cuda_only_training_options_are_refused_on_a_cpu():
    for variant in ("ours-padded-stepgraph-compiled", "ours-cudnn"):
        bench_train.check_variant(variant, CUDA)
        with pytest.raises(ValueError, match="needs a CUDA device"):
            bench_train.check_variant(variant, torch.device("cpu"))


@pytest.mark.parametrize(
    "variant, message",
    [
        ("ours-compiled-bf16", "ours takes the options -bf16, -cdtuned, -compiled, -eager, in that order"),
        ("ours-bf16-cdtuend-compiled", "in that order, each at most once"),
        ("ours-bf16-bf16", "each at most once"),
        ("hf-compiled", "hf takes the options -static, -bf16"),
        ("nanogpt", "must start with one of ours, hf"),
        ("ours-compiled-eager", "-compiled and -eager exclude each other"),
        ("ours-bf16-cdtuned", "-cdtuned tunes compiled decoding; add -compiled"),
    ],
)
def test_a_bad_sampling_variant_is_refused(variant, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        bench_generate.check_variant(variant)


def test_bench_generate_refuses_a_bad_variant_before_building_anything(tmp_path):
    """Exit status 2 and the reason, from argparse, with nothing appended to the results file."""
    results = tmp_path / "RESULTS.md"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_generate.py", "--variants", "ours,ours-compield", "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "variant 'ours-compield'" in run.stderr
    assert not results.exists()


def test_bench_generate_removes_its_checkpoint_when_done(tmp_path):
    """It saves a random GPT-2 small (500 MB) to read back as each peer does. Before, the folder
    stayed in the temporary directory after every run. The smallest run: one variant, two tokens."""
    temp, results = tmp_path / "tmp", tmp_path / "RESULTS.md"
    temp.mkdir()
    args = ["--device", "cpu", "--batch-sizes", "1", "--new-tokens", "2", "--variants", "ours", "--repeats", "1"]
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_generate.py", *args, "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert re.search(r"^\| 1 \| ours \| [\d,]+ \|", results.read_text(), flags=re.MULTILINE)  # it measured
    assert not list(temp.glob("bench-generate-*"))
