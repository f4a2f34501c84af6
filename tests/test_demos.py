"""The demos as a user runs them, and load_model, which they load through."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_small import Transformer, TransformerConfig, load_model

REPO = Path(__file__).resolve().parents[1]
SMALL = TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, n_ctx=64, d_vocab=50304)


def offline_env() -> dict[str, str]:
    # Built per call, not at import, so the demos inherit conftest's private cache directories.
    return os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def run_demo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "demos" / "generate_demo.py"), *args]
    return subprocess.run(cmd, env=offline_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory) -> Path:
    """An output directory shaped like train_demo's, with two checkpoints and a `latest` pointer."""
    run = tmp_path_factory.mktemp("run")
    for step, seed in [(1, 0), (2, 1)]:
        torch.manual_seed(seed)
        Transformer(SMALL).save(run / "checkpoints" / f"step-{step:07d}")
    (run / "checkpoints" / "latest").write_text("step-0000002")
    return run


def test_load_model_reads_every_kind_of_directory(train_run, tiny_checkpoint):
    newest = Transformer.load(train_run / "checkpoints" / "step-0000002")
    from_run = load_model(train_run)
    assert torch.equal(from_run.embed.W_E, newest.embed.W_E)  # the run's newest checkpoint
    assert torch.equal(load_model(train_run / "checkpoints" / "step-0000001").embed.W_E,
                       Transformer.load(train_run / "checkpoints" / "step-0000001").embed.W_E)  # fmt: skip
    directory, hf = tiny_checkpoint
    from_hf = load_model(directory)
    assert torch.equal(from_hf.embed.W_E, hf.transformer.wte.weight)
    from_step = load_model(train_run / "checkpoints" / "step-0000001")
    assert not (from_run.training or from_step.training or from_hf.training)


def test_loaders_pointed_at_a_training_run_say_that_load_model_reads_it(train_run, tmp_path):
    hint = re.escape(f"; {train_run} holds a training run: gpt2_small.load_model('{train_run}') loads its newest")
    with pytest.raises(FileNotFoundError, match=r"gpt2_small_config.json not found: .*" + hint):
        Transformer.load(train_run)
    with pytest.raises(FileNotFoundError, match=r"config.json not found; .*" + hint):
        Transformer.from_pretrained(train_run)
    with pytest.raises(FileNotFoundError) as elsewhere:  # any other directory: no such hint
        Transformer.load(tmp_path)
    assert "training run" not in str(elsewhere.value)


def test_load_model_errors_name_the_problem(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_model(tmp_path / "missing" / "dir")


def test_generate_demo_runs_every_section_on_a_train_demo_checkpoint(train_run):
    result = run_demo("--run-dir", str(train_run), "--max-new-tokens", "6", "--top-k", "20")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"model: {train_run / 'checkpoints' / 'step-0000002'} (newest train_demo checkpoint)" in out
    for heading in ("random-init model", "several temperatures", "top-k and top-p", "greedy against sampling",
                    "beam search", "streaming"):  # fmt: skip
        assert heading in out, heading
    assert "[greedy (T=0)] ROMEO:" in out and "[top_p=0.95] ROMEO:" in out
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "1.5"], "top_p must be in (0, 1] or None, got 1.5"),
        (["--prompt", ""], "the prompt is empty; use '<|endoftext|>' for an unconditional sample"),
        (["--max-new-tokens", "-1"], "max_new_tokens must be an int >= 0, got -1"),
        # Before: three sections of bare prompts, then beam search's refusal.
        (["--max-new-tokens", "0"], "max_new_tokens=0 leaves nothing to show; ask for at least 1"),
        (["--max-new-tokens", "100"], "prompt of 3 tokens + max_new_tokens=100 = 103 exceeds n_ctx=64; "
                                      "shorten the prompt or ask for fewer tokens"),
    ],
)  # fmt: skip
def test_generate_demo_reports_bad_settings_in_one_line(train_run, args, message):
    result = run_demo("--run-dir", str(train_run), *args)
    assert result.stdout.count("===") == 0  # refused before any sample
    assert result.returncode == 2
    assert result.stderr.strip() == f"generate_demo: {message}"


def test_generate_demo_reports_an_unloadable_model_in_one_line(tmp_path):
    result = run_demo("--model", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "no checkpoint directory" in result.stderr


def test_generate_demo_reports_a_broken_newest_checkpoint_rather_than_falling_back(train_run, tmp_path):
    """Its weights file gone, the newest checkpoint is named in the error. The demo once took the
    FileNotFoundError for "no checkpoint" and went on with a random model, saying there was none."""
    run = tmp_path / "run"
    shutil.copytree(train_run / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "step-0000002" / "model.safetensors").unlink()
    result = run_demo("--run-dir", str(run), "--max-new-tokens", "2")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "step-0000002/model.safetensors not found" in result.stderr


@pytest.mark.slow
def test_generate_demo_falls_back_to_a_random_model_offline(tmp_path):
    result = run_demo("--run-dir", str(tmp_path / "no-run"), "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("no train_demo checkpoint and no network for gpt2")
    assert "model: random GPT-2 small" in result.stdout
    assert "Traceback" not in result.stderr


def run_interp_demo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "demos" / "interp_demo.py"), *args]
    return subprocess.run(cmd, env=offline_env(), capture_output=True, text=True, timeout=timeout)


def test_interp_demo_writes_every_png_and_prints_the_top_induction_heads(train_run, tmp_path):
    result = run_interp_demo("--run-dir", str(train_run), "--out-dir", str(tmp_path / "interp"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"model: {train_run} (newest checkpoint); 2 layers x 2 heads" in out
    heads = [line.strip() for line in out.split("top induction heads")[1].splitlines()[1:6] if line.strip()]
    assert len(heads) == 4 and all(line.startswith(("L0H", "L1H")) for line in heads)  # 2 x 2 heads, best first
    pngs = sorted(p.name for p in (tmp_path / "interp").glob("*.png"))
    assert len(pngs) == 6 and {"induction_scores.png", "logit_lens.png", "composition_K.png"} <= set(pngs), pngs
    best = heads[0].split(":")[0]
    if best.startswith("L1"):  # the layer-0 heads its keys read, by K-composition, best first
        readers = out.split(f"heads whose output {best}'s keys read most")[1].splitlines()[0]
        assert readers.count("L0H") == 2 and "random heads score about 0.177" in readers, readers
    else:
        assert f"{best} is in layer 0: no earlier head's output reaches its keys" in out
    assert all((tmp_path / "interp" / name).stat().st_size > 1000 for name in pngs)
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_interp_demo_offline_without_a_checkpoint_trains_a_short_run_first(tmp_path):
    result = run_interp_demo("--run-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "interp"),
                             "--train-steps", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no train_demo checkpoint and no network for gpt2: training the tiny model for 3 steps" in result.stdout
    assert (tmp_path / "interp" / "train" / "checkpoints").is_dir()
    assert len(list((tmp_path / "interp").glob("*.png"))) == 6


def import_demo(name: str):
    """A demo script as a module, so that a test can call its main() and patch what it calls."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "demos" / f"{name}.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_train_demo_says_whether_an_interrupted_run_can_be_resumed(tmp_path, monkeypatch, capsys):
    """Before: "the checkpoint above holds the progress (continue with --resume)" also after a Ctrl-C
    while the data was loading, when there was no checkpoint and --resume would fail."""
    demo = import_demo("train_demo")

    monkeypatch.setattr(demo, "Trainer", interrupt)  # while the data loads, before any checkpoint
    assert demo.main(["--out-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "interrupted before any checkpoint was written; there is nothing to --resume\n"
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')  # Ctrl-C during the first sample: a fresh start is refused
    assert demo.main(["--out-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err == (
        "interrupted before any checkpoint was written; there is nothing to --resume; start again with "
        f"--overwrite (it deletes what {tmp_path} holds)\n"
    )
    checkpoint = tmp_path / "checkpoints" / "step-0000004"  # an earlier run's, as --resume finds it
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"")
    assert demo.main(["--out-dir", str(tmp_path), "--resume"]) == 130
    assert capsys.readouterr().err == f"interrupted; the newest checkpoint is {checkpoint} (continue with --resume)\n"


def test_generate_demo_ends_an_interrupted_stream_in_one_line(train_run, monkeypatch, capsys):
    """Before: a Ctrl-C printed Python's KeyboardInterrupt traceback after the half-streamed line."""
    demo = import_demo("generate_demo")
    monkeypatch.setattr(demo, "stream_text", interrupt)  # the last section, after all the others printed
    assert demo.main(["--run-dir", str(train_run), "--max-new-tokens", "2"]) == 130
    out, err = capsys.readouterr()
    assert "=== streaming" in out and "=== greedy against sampling" in out
    assert err == "\ngenerate_demo: interrupted\n"


def test_interp_demo_refuses_two_answers_that_are_one_token(tmp_path, capsys):
    """Before: it ran every experiment on a logit difference of 0 and plotted blank patching maps."""
    demo = import_demo("interp_demo")
    assert demo.main(["--answers", " Romeo", " Romeo", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "interp_demo: --answers ' Romeo' and ' Romeo' are the same token (43989); their logit difference is 0 in "
        "every run, so there is nothing to patch or attribute\n"
    )
    assert not list(tmp_path.glob("*.png"))


def test_interp_demo_interrupted_names_the_pngs_already_written(train_run, tmp_path, monkeypatch, capsys):
    """Before: a Ctrl-C printed Python's KeyboardInterrupt traceback and nothing about the PNGs."""
    demo = import_demo("interp_demo")
    out_dir = tmp_path / "interp"
    monkeypatch.setattr(demo.interp, "plot_attention_patterns", interrupt)  # the second plot, after the first
    assert demo.main(["--run-dir", str(train_run), "--out-dir", str(out_dir)]) == 130
    assert capsys.readouterr().err == f"\ninterp_demo: interrupted; PNGs in {out_dir}: induction_scores.png\n"
    monkeypatch.setattr(demo.interp, "induction_score", interrupt)  # the first experiment
    (out_dir / "induction_scores.png").unlink()
    assert demo.main(["--run-dir", str(train_run), "--out-dir", str(out_dir)]) == 130
    assert capsys.readouterr().err == "\ninterp_demo: interrupted; no PNG was written yet\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", ""], "--prompt '' is 0 tokens; it needs at least 2"),
        (["--prompt", "a"], "--prompt 'a' is 1 token; it needs at least 2"),
        (["--clean", "", "--corrupted", ""], "--clean '' is 0 tokens; it needs at least 1"),
        (["--corrupted", "short"], "--clean is 14 tokens, --corrupted 1; they must match"),
        (
            ["--answers", " Romeo", " Julietttt"],
            "--answers must be single tokens, for the logit difference: ' Julietttt' is 3 tokens",
        ),
        (["--train-steps", "0"], "--train-steps must be >= 1, got 0"),
    ],
)
def test_interp_demo_refuses_bad_arguments_before_loading_the_model(args, message, tmp_path, monkeypatch, capsys):
    """Before: a traceback (empty or one-token prompts), or a refusal after minutes of work (a
    --corrupted of another length came after three experiments, a bad answer after a fallback training)."""
    demo = import_demo("interp_demo")
    monkeypatch.setattr(demo, "load", lambda *a: pytest.fail("the model was loaded before the arguments were checked"))
    assert demo.main(["--out-dir", str(tmp_path / "out"), *args]) == 2
    assert capsys.readouterr().err.startswith(f"interp_demo: {message}")
    assert not (tmp_path / "out").exists()


def test_interp_demo_refuses_an_out_dir_that_is_a_file_and_prompts_longer_than_the_model(train_run, tmp_path, capsys):
    demo = import_demo("interp_demo")
    file = tmp_path / "notes.txt"
    file.write_text("a file")
    assert demo.main(["--run-dir", str(train_run), "--out-dir", str(file)]) == 2
    assert (
        capsys.readouterr().err
        == f"interp_demo: --out-dir '{file}' is a file; choose a directory (it is created if missing)\n"
    )
    long = ["--clean", "a" + " a" * 70, "--corrupted", "b" + " b" * 70]  # 71 tokens each; n_ctx is 64
    assert demo.main(["--run-dir", str(train_run), "--out-dir", str(tmp_path / "out"), *long]) == 2
    assert capsys.readouterr().err == "interp_demo: --clean and --corrupted are 71 tokens, more than n_ctx=64\n"
    assert not (tmp_path / "out").exists()


def test_the_demos_share_one_default_training_run_whatever_the_working_directory(tmp_path, monkeypatch):
    """Before: train_demo wrote to runs/train_demo under the working directory, while generate_demo
    and interp_demo looked under the repository, so a run started elsewhere was not found."""
    monkeypatch.chdir(tmp_path)
    written = import_demo("train_demo").build_parser().parse_args([]).out_dir
    read = [import_demo(name).build_parser().parse_args([]).run_dir for name in ("generate_demo", "interp_demo")]
    assert [written, *read] == [str(REPO / "runs" / "train_demo")] * 3


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], (None, None)),
        (["--tie-embeddings", "--no-unembed-bias"], (True, False)),
        (["--no-tie-embeddings"], (False, None)),
    ],
)
def test_train_demo_leaves_the_unembedding_settings_to_the_preset_unless_given(args, expected):
    parsed = import_demo("train_demo").build_parser().parse_args(args)
    assert (parsed.tie_embeddings, parsed.unembed_bias) == expected  # None: TrainConfig takes the preset's


@pytest.mark.parametrize("demo", ["train_demo", "generate_demo", "interp_demo"])
def test_demos_refuse_an_unknown_device_in_one_line(demo, tmp_path):
    cmd = [sys.executable, str(REPO / "demos" / f"{demo}.py"), "--device", "foo", "--out-dir", str(tmp_path / "out")]
    if demo == "generate_demo":
        cmd[-2:] = ["--run-dir", str(tmp_path)]  # it writes nothing; the flag keeps it off the repo's runs/
    result = subprocess.run(cmd, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"{demo}: device 'foo' is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("demo", ["train_demo", "generate_demo", "interp_demo"])
def test_demo_help_states_each_options_default_once(demo):
    result = subprocess.run(
        [sys.executable, str(REPO / "demos" / f"{demo}.py"), "--help"],
        env=offline_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # One block per option: its line in the usage listing and the wrapped help lines under it.
    blocks = re.split(r"\n(?=  -)", result.stdout.split("\noptions:\n", 1)[1])
    assert len(blocks) > 5, result.stdout
    for block in blocks:
        if block.lstrip().startswith("-h, --help"):
            continue
        said = re.findall(r"\bdefault\b", block)
        # argparse would append "(default: None)" after a help that already describes the default
        assert len(said) == 1, block
        assert "(default: None)" not in " ".join(block.split()), block
