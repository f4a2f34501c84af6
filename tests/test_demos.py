"""The demos as a user runs them, and load_model, which they load through."""

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2_small import (
    EOT_ID,
    BeamSearchOutput,
    Transformer,
    TransformerConfig,
    beam_search,
    generate_text,
    get_tokenizer,
    interp,
    load_model,
    process_weights,
    to_single_token,
    to_tokens,
)
from gpt2_small.training import TrainConfig, TrainingTerminated, latest_checkpoint

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
    folder = train_run / "checkpoints"  # before: only "config.json not found"
    hint = re.escape(
        f"; {folder} is a training run's checkpoints folder: gpt2_small.load_model('{train_run}') loads its newest "
        "checkpoint, or name one of the step-* directories in it"
    )
    for loader in (Transformer.load, Transformer.from_pretrained, load_model):
        with pytest.raises(FileNotFoundError, match=r"config.json not found.*" + hint + "$"):
            loader(folder)
    (tmp_path / "checkpoints").mkdir()  # a folder of that name with no checkpoint in it: no such hint
    with pytest.raises(FileNotFoundError) as elsewhere:
        Transformer.load(tmp_path / "checkpoints")
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


def test_generate_demo_labels_say_what_made_each_sample(train_run, capsys):
    """Each sample is the library's for the settings its label names: temperature, top-k, top-p and
    seed (--seed, and the next seed for the second of your settings' samples), the random model
    initialised under --seed, beam search with its log-prob, and the stream with your settings. Each
    continuation follows one copy of the prompt."""
    prompt, n, seed = "JULIET:", 12, 3
    argv = ["--run-dir", str(train_run), "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0.7",
            "--top-k", "7", "--seed", str(seed)]  # fmt: skip
    assert import_demo("generate_demo").main(argv) == 0
    out = capsys.readouterr().out
    model, tok = load_model(train_run), get_tokenizer()

    def sample(**settings):
        return generate_text(model, tok, prompt, n, **settings)

    torch.manual_seed(seed)
    expected = [("random, T=1", generate_text(Transformer(model.cfg).eval(), tok, prompt, n, seed=seed))]
    expected += [("greedy (T=0)", sample(temperature=0))]
    expected += [(f"T={t}", sample(temperature=t, seed=seed)) for t in (0.5, 1.0, 1.5)]
    expected += [(f"{k}={v}", sample(seed=seed, **{k: v})) for k, v in
                 [("top_k", 10), ("top_k", 100), ("top_p", 0.5), ("top_p", 0.95)]]  # fmt: skip
    expected += [("greedy", sample(temperature=0))]
    expected += [(f"temperature=0.7, top_k=7, seed {s}", sample(temperature=0.7, top_k=7, seed=s)) for s in (3, 4)]
    beams = beam_search(model, to_tokens(prompt), num_beams=4, max_new_tokens=n, no_repeat_ngram_size=3)
    expected += [(f"beam search, 4 beams, no 3-gram repeats (log-prob {beams.log_probs[0]:.1f})",
                  tok.decode(beams.tokens[0].tolist()))]  # fmt: skip
    assert re.findall(r"^\[(.+?)\] ", out, flags=re.M) == [label for label, _ in expected]
    for label, text in expected:
        assert text.startswith(prompt) and len(text) > len(prompt), label
        # Later lines of a sample are indented under its label.
        assert f"[{label}] {prompt}" + text[len(prompt) :].replace("\n", "\n    ") + "\n" in out, label
    assert len({text for _, text in expected}) >= 8  # the settings do change the samples
    streamed = re.search(r"=== streaming \((.+?)\), piece by piece.*?\n(.*)\n\(12 tokens at most", out, flags=re.S)
    assert streamed[1] == "temperature=0.7, top_k=7"
    assert streamed[2] == sample(temperature=0.7, top_k=7, seed=seed)


# Settings wrong whatever the model, and what generate_demo says of each.
BAD_SETTINGS = [
    (["--top-p", "1.5"], "top_p must be in (0, 1] or None, got 1.5"),
    (["--top-k", "0"], "top_k must be an int >= 1 or None, got 0"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--prompt", ""], "the prompt is empty; use '<|endoftext|>' for an unconditional sample"),
    (["--max-new-tokens", "-1"], "max_new_tokens must be an int >= 0, got -1"),
    # Before: three sections of bare prompts, then beam search's refusal.
    (["--max-new-tokens", "0"], "max_new_tokens=0 leaves nothing to show; ask for at least 1"),
    # Before: torch's "Overflow when unpacking long long", after the first section's header.
    (["--seed", str(2**64)], f"seed {2**64} is outside the range torch's generators take, [-2**63, 2**64)"),
    (["--seed", str(2**64 - 1)], f"seed {2**64 - 1} leaves no seed + 1 for the second sample; pass a smaller one"),
]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        *BAD_SETTINGS,
        # These two depend on the model: its n_ctx, its d_vocab.
        (["--max-new-tokens", "100"], "prompt of 3 tokens + max_new_tokens=100 = 103 exceeds n_ctx=64; "
                                      "shorten the prompt or ask for fewer tokens"),
        (["--top-k", "50305"], "top_k must be an int in [1, d_vocab=50304] or None, got 50305"),
    ],
)  # fmt: skip
def test_generate_demo_reports_bad_settings_in_one_line(train_run, args, message):
    result = run_demo("--run-dir", str(train_run), *args)
    assert result.stdout.count("===") == 0  # refused before any sample
    assert result.returncode == 2
    assert result.stderr.strip() == f"generate_demo: {message}"


@pytest.mark.parametrize(("args", "message"), BAD_SETTINGS)
def test_generate_demo_refuses_bad_settings_before_loading_a_model(tmp_path, capsys, args, message):
    """Before: these were checked once the model had loaded (gpt2 from the hub is a 500 MB
    download), so a model that could not load was reported instead, and a random one was built."""
    assert import_demo("generate_demo").main(["--model", str(tmp_path / "nowhere"), *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"generate_demo: {message}\n"


def test_generate_demo_names_a_prompt_the_models_vocabulary_lacks(tmp_path, capsys):
    """Before: "token id 33676 is outside [0, d_vocab=1000)", naming neither the prompt nor the model."""
    model_dir = tmp_path / "small-vocab"
    Transformer(dataclasses.replace(SMALL, d_vocab=1000)).save(model_dir)
    demo = import_demo("generate_demo")
    assert demo.main(["--model", str(model_dir)]) == 2
    out, err = capsys.readouterr()
    assert "===" not in out
    assert err == (
        f"generate_demo: --prompt has token id 33676, outside the vocabulary of {model_dir} (d_vocab=1000); its "
        "text is GPT-2 tokens: use a model of GPT-2's vocabulary, or a prompt it has tokens for\n"
    )
    assert demo.main(["--model", str(model_dir), "--prompt", "a b", "--max-new-tokens", "2"]) == 0  # ids 64, 275


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


def test_generate_demo_shows_a_beam_that_ended_without_its_endoftext(train_run, monkeypatch, capsys):
    """Before: a beam that chose <|endoftext|> was printed with it, where the samples stop before it."""
    demo = import_demo("generate_demo")
    tok = get_tokenizer()
    ended = tok.encode("ROMEO: O Juliet") + [EOT_ID]

    def beam_search(model, tokens, num_beams, max_new_tokens, **kwargs):
        assert tokens.tolist() == [tok.encode("ROMEO:")] and (num_beams, max_new_tokens) == (4, 5)
        return BeamSearchOutput(torch.tensor([ended]), torch.tensor([-0.5]), torch.tensor([-1.5]), torch.tensor([3]))

    monkeypatch.setattr(demo, "beam_search", beam_search)
    assert demo.main(["--run-dir", str(train_run), "--max-new-tokens", "5"]) == 0
    assert "[beam search, 4 beams, no 3-gram repeats (log-prob -1.5)] ROMEO: O Juliet\n" in capsys.readouterr().out


def flat_model() -> Transformer:
    """SMALL with every weight 0: the same logits, so the same score, for every token."""
    model = Transformer(SMALL)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model


def test_generate_demo_beam_search_repeats_no_3_gram(tmp_path, monkeypatch, capsys):
    """A model with every weight 0 scores every token alike, so only the ban keeps beam search from
    repeating one token: the shown beam has no 3-gram twice, and each token's log-prob is -log 50257."""
    flat_model().save(tmp_path / "flat")
    demo = import_demo("generate_demo")
    found = []

    def recorded(*args, **kwargs):
        found.append(beam_search(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(demo, "beam_search", recorded)
    assert demo.main(["--model", str(tmp_path / "flat"), "--max-new-tokens", "8"]) == 0
    tokens = found[0].tokens[0].tolist()
    assert len(tokens) == len(get_tokenizer().encode("ROMEO:")) + 8
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    assert len(set(trigrams)) == len(trigrams), tokens
    log_prob = 8 * -math.log(50257)
    assert f"[beam search, 4 beams, no 3-gram repeats (log-prob {log_prob:.1f})] " in capsys.readouterr().out


def test_generate_demo_indents_a_samples_later_lines_under_its_label(tmp_path, capsys):
    """A model that always says "\\n": each sample's continuation lines start indented, so no line of
    generated text can pass for a new label."""
    model = flat_model()
    with torch.no_grad():
        model.unembed.b_U[get_tokenizer().encode("\n")[0]] = 20.0
    model.save(tmp_path / "newlines")
    assert import_demo("generate_demo").main(["--model", str(tmp_path / "newlines"), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "\n[greedy (T=0)] ROMEO:\n    \n    \n    \n[T=0.5] ROMEO:\n    \n    \n    \n" in out


def test_generate_demo_reports_a_checkpoint_it_cannot_build_in_one_line(train_run, tmp_path, capsys):
    """A config that TransformerConfig refuses (a ValueError, not an OSError) is reported like a missing file."""
    checkpoint = tmp_path / "edited"
    shutil.copytree(train_run / "checkpoints" / "step-0000001", checkpoint)
    saved = json.loads((checkpoint / "gpt2_small_config.json").read_text())
    saved["config"]["n_heads"] = 0
    (checkpoint / "gpt2_small_config.json").write_text(json.dumps(saved))
    assert import_demo("generate_demo").main(["--model", str(checkpoint)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"generate_demo: could not load '{checkpoint}': TransformerConfig.n_heads must be positive, got 0\n"


def test_generate_demo_offline_fallback_is_one_seeded_random_model(tmp_path, capsys, offline_hub):
    """With no checkpoint and no hub, the random GPT-2 small is initialised under a fixed seed, whatever
    the caller's random state: two runs sample from the same model."""
    demo = import_demo("generate_demo")
    weights = []
    for state in (1, 2):
        torch.manual_seed(state)
        model, origin = demo.load(None, tmp_path / "no-run", torch.device("cpu"))
        assert origin == "random GPT-2 small" and model.cfg == TransformerConfig()
        weights.append(model.blocks[0].attn.W_Q.detach())
    assert capsys.readouterr().out.startswith("no train_demo checkpoint and no network for gpt2 from the hub")
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


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


def test_interp_demo_prints_and_plots_what_the_library_computes(tmp_path, monkeypatch, capsys):
    """Each number the interp demo prints and each map it plots, checked on the model it loaded: the
    induction scores, their top heads and the uniform-attention baseline; the best head's layer's
    attention; the logit lens's next-token log-probs and their mean over each copy of the line; the
    logit differences; patching in logit difference recovered (0 = as corrupted, the gap = clean);
    the heads that recover most; direct logit attribution of the clean run; K-composition of the
    folded weights and the best head's readers. The weights are drawn at scale 0.3: a 0.02 init
    predicts about -log(50257) everywhere, at every layer and for both prompts, which hides a mix-up."""
    torch.manual_seed(3)  # a seed whose best induction head is L1H1: its readers are not head 0's
    Transformer(dataclasses.replace(SMALL, init_range=0.3)).save(tmp_path / "model")
    demo = import_demo("interp_demo")
    plotted = {}

    def recorder(name):
        def record(values, *args, **kwargs):
            plotted.setdefault(name, []).append((values, kwargs.get("title")))

        return record

    for name in ("induction_scores", "attention_patterns", "logit_lens", "patching", "composition_scores"):
        monkeypatch.setattr(demo.interp, f"plot_{name}", recorder(name))
    out_dir = tmp_path / "not" / "yet" / "there"
    assert demo.main(["--model", str(tmp_path / "model"), "--out-dir", str(out_dir)]) == 0
    assert out_dir.is_dir()
    out = capsys.readouterr().out
    model = load_model(tmp_path / "model")
    exact = dict(rtol=0, atol=0)  # the same computation on the same weights

    seq_len = 31  # the longest repeat that fits n_ctx=64 with its BOS
    scores = interp.induction_score(model, seq_len=seq_len, batch=8)
    torch.testing.assert_close(plotted["induction_scores"][0][0], scores, **exact)
    top = interp.top_heads(scores, k=5)
    assert "".join(f"\n  {name}: {score:.3f}" for name, score in top) in out
    # Uniform attention over a causal prefix scores 1 / (keys seen) at each query of the second copy.
    uniform = float((1 / torch.arange(seq_len + 2, 2 * seq_len + 2)).mean())
    assert abs(float(re.search(r"uniform attention would give ~([\d.]+)", out)[1]) - uniform) <= 0.005

    best = top[0][0]
    layer, head = int(best[1]), int(best[3])
    assert (layer, head) == (1, 1)
    line = to_tokens(f"{demo.LINE} {demo.LINE}")
    with torch.no_grad():
        _, cache = model.run_with_cache(line)
    torch.testing.assert_close(plotted["attention_patterns"][0][0], cache["pattern", layer][0], **exact)
    next_log_probs = interp.logit_lens(model, line).log_probs_of(line[:, 1:])[:, 0]
    torch.testing.assert_close(plotted["logit_lens"][0][0], next_log_probs, **exact)
    first_copy = to_tokens(demo.LINE).shape[1] - 1  # its tokens after the BOS: the first predictions' targets
    final = next_log_probs[-1]
    assert (f"first copy of the line {final[:first_copy].mean():.2f}, second copy "
            f"{final[first_copy:].mean():.2f}") in out  # fmt: skip

    clean, corrupted = to_tokens(demo.CLEAN), to_tokens(demo.CORRUPTED)
    good, bad = to_single_token(" Romeo"), to_single_token(" Juliet")
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    clean_diff = float(clean_logits[0, -1, good] - clean_logits[0, -1, bad])
    corrupted_diff = float(corrupted_logits[0, -1, good] - corrupted_logits[0, -1, bad])
    assert f"logit difference ' Romeo' - ' Juliet': clean {clean_diff:.2f}, corrupted {corrupted_diff:.2f}" in out
    gap = clean_diff - corrupted_diff
    assert abs(gap) >= 0.1 and "barely tells the two prompts apart" not in out
    (by_position, position_title), (by_head, head_title) = plotted["patching"]
    assert f"(clean = {gap:+.2f})" in position_title and f"(clean = {gap:+.2f})" in head_title
    # The prompts differ at one token: patching its embedding in gives the clean run, elsewhere nothing.
    (changed,) = (clean[0] != corrupted[0]).nonzero()[0].tolist()
    torch.testing.assert_close(by_position[0, changed], torch.tensor(gap), rtol=0, atol=1e-5)
    torch.testing.assert_close(by_position[0, :changed], torch.zeros(changed), rtol=0, atol=1e-5)
    assert by_position.abs().max() > 0  # a gap of 0 would make the checks above vacuous
    recovered = interp.activation_patching(
        model, clean, corrupted, lambda logits: logits[0, -1, good] - logits[0, -1, bad] - corrupted_diff, by="head"
    )
    torch.testing.assert_close(by_head, recovered, rtol=0, atol=1e-6)
    top_recovering = ", ".join(f"{name} {value:+.2f}" for name, value in interp.top_heads(recovered, 3))
    assert f"heads whose clean z recovers the most: {top_recovering}\n" in out
    dla = interp.direct_logit_attribution(model, clean_cache, good, bad)
    torch.testing.assert_close(dla.contributions.sum(), torch.tensor(clean_diff), rtol=0, atol=1e-5)
    assert "largest components: " + ", ".join(f"{name} {value:+.2f}" for name, value in dla.top(5)) + "\n" in out

    composition = process_weights(copy.deepcopy(model)).all_composition_scores("K")
    torch.testing.assert_close(plotted["composition_scores"][0][0], composition, **exact)
    if layer > 0:
        readers = interp.top_heads(composition[:layer, :, layer, head], 3)
        said = ", ".join(f"{name} {value:.3f}" for name, value in readers)
        assert f"{best}'s keys read most (K-composition; random heads score about 0.177): {said}\n" in out
    else:
        assert f"{best} is in layer 0: no earlier head's output reaches its keys" in out


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


def test_train_demo_names_sigterm_and_exits_as_a_shell_does(tmp_path, monkeypatch, capsys):
    demo = import_demo("train_demo")

    def terminated(*args, **kwargs):
        raise TrainingTerminated

    monkeypatch.setattr(demo, "Trainer", terminated)
    assert demo.main(["--out-dir", str(tmp_path)]) == 143  # 128 + SIGTERM's 15
    err = capsys.readouterr().err
    assert err == "terminated (SIGTERM) before any checkpoint was written; there is nothing to --resume\n"
    # Under torchrun only rank 0 answers, once it has written the checkpoint. Before, rank 1 looked
    # first and said there was nothing to --resume.
    monkeypatch.setenv("RANK", "1")
    assert demo.main(["--out-dir", str(tmp_path)]) == 143
    monkeypatch.setattr(demo, "Trainer", interrupt)
    assert demo.main(["--out-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ""


def read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_demo_checkpoints_on_a_real_sigterm(tmp_path):
    """A scheduler's time limit or preemption sends SIGTERM, then SIGKILL. Before, Python's default
    ended the run at once and every step since the last checkpoint was lost."""
    out_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "demos" / "train_demo.py"), "--out-dir", str(out_dir), "--device", "cpu",
           "--batch-size", "2", "--max-steps", "100000", "--eval-interval", "0", "--sample-interval", "0",
           "--sample-tokens", "2", "--warmup-steps", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out_dir / "metrics.jsonl").exists() or len(read_rows(out_dir)) < 4:  # the unigram row + 3 steps
            assert proc.poll() is None and time.monotonic() < deadline, "train_demo ended or never started stepping"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    checkpoint = latest_checkpoint(out_dir)
    assert checkpoint is not None
    assert err.endswith(f"terminated (SIGTERM); the newest checkpoint is {checkpoint} (continue with --resume)\n")
    assert f"terminated (SIGTERM) at step {int(checkpoint.name[5:])}; checkpoint saved to {checkpoint}" in err
    steps = [row["step"] for row in read_rows(out_dir) if "loss" in row]
    assert steps == list(range(1, int(checkpoint.name[5:]) + 1))  # every step up to the checkpoint's logged


def test_train_demo_reports_its_run_refuses_a_second_start_and_resumes(tmp_path, capsys):
    """A short run on the bundled Shakespeare, as a user starts it: the last validation loss and the
    unigram baseline are reported; a second start in the same --out-dir is refused in one line;
    --resume continues from the newest checkpoint."""
    demo = import_demo("train_demo")
    out_dir = tmp_path / "run"
    argv = ["--out-dir", str(out_dir), "--batch-size", "2", "--eval-interval", "1", "--eval-batches", "1",
            "--sample-tokens", "2", "--warmup-steps", "1", "--device", "cpu"]  # fmt: skip
    assert demo.main([*argv, "--max-steps", "2"]) == 0
    rows = read_rows(out_dir)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    unigram = next(r["unigram_val_loss"] for r in rows if "unigram_val_loss" in r)
    assert f"{val[0]:.3f}" != f"{val[-1]:.3f}"  # the report names the last
    out = capsys.readouterr().out
    assert f"\nfinal validation loss {val[-1]:.3f} nats/token (unigram baseline {unigram:.3f})\n" in out
    assert demo.main([*argv, "--max-steps", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"train_demo: {out_dir} holds an earlier run (checkpoints, ")
    assert demo.main([*argv, "--max-steps", "3", "--resume"]) == 0
    assert [r["step"] for r in read_rows(out_dir) if "loss" in r] == [1, 2, 3]


def test_train_demo_reports_divergence_in_one_line(tmp_path, capsys):
    demo = import_demo("train_demo")
    argv = ["--out-dir", str(tmp_path), "--batch-size", "2", "--eval-interval", "0", "--eval-batches", "1",
            "--sample-tokens", "2", "--warmup-steps", "1", "--device", "cpu", "--max-steps", "4", "--lr", "1e12"]  # fmt: skip
    assert demo.main(argv) == 1
    err = capsys.readouterr().err
    # One line after the progress bar, with no traceback; no checkpoint was due, so it says to start again.
    assert re.search(r"\ntrain_demo: training diverged at step \d: loss \S+, gradient norm .+ --overwrite\.\n\Z", err)
    assert "Traceback" not in err


def test_train_demo_with_no_flags_trains_trainconfigs_defaults():
    parsed = vars(import_demo("train_demo").build_parser().parse_args([]))
    assert parsed.pop("resume") is False
    assert TrainConfig(**parsed) == TrainConfig(out_dir=str(REPO / "runs" / "train_demo"))
    flags = ["--lr", "3e-4", "--batch-size", "3", "--no-fused-loss", "--compile", "--epochs", "2"]
    parsed = vars(import_demo("train_demo").build_parser().parse_args(flags))
    chosen = {name: parsed[name] for name in ("lr", "batch_size", "fused_loss", "compile", "epochs")}
    assert chosen == {"lr": 3e-4, "batch_size": 3, "fused_loss": False, "compile": True, "epochs": 2}


def test_train_demo_help_states_each_presets_defaults():
    options = re.split(r"\n(?=  -)", import_demo("train_demo").build_parser().format_help())
    said = {block.split()[0].rstrip(","): " ".join(block.split()) for block in options if block.startswith("  -")}
    assert "(default by preset: gpt2 6.0e-04, tiny 1.5e-03)" in said["--lr"]
    assert "(default by preset: gpt2 6.0e-05, tiny 1.5e-04; lr / 10 when --lr is given)" in said["--min-lr"]
    # GPT-2's own form for gpt2: W_U tied to W_E, and no b_U; TransformerLens's for tiny.
    assert "(default by preset: gpt2 off, tiny on)" in said["--unembed-bias"]
    assert "(default by preset: gpt2 on, tiny off)" in said["--tie-embeddings"]


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
    plot_attention_patterns = demo.interp.plot_attention_patterns
    monkeypatch.setattr(demo.interp, "plot_attention_patterns", interrupt)  # the second plot, after the first
    assert demo.main(["--run-dir", str(train_run), "--out-dir", str(out_dir)]) == 130
    assert capsys.readouterr().err == f"\ninterp_demo: interrupted; PNGs in {out_dir}: induction_scores.png\n"
    monkeypatch.setattr(demo.interp, "plot_attention_patterns", plot_attention_patterns)
    monkeypatch.setattr(demo.interp, "plot_patching", interrupt)  # the fourth, after three in another order
    assert demo.main(["--run-dir", str(train_run), "--out-dir", str(out_dir)]) == 130
    assert capsys.readouterr().err.endswith(  # after the patching's progress bar
        f"\ninterp_demo: interrupted; PNGs in {out_dir}: attention_layer1.png, induction_scores.png, logit_lens.png\n"
    )
    for png in ("attention_layer1.png", "logit_lens.png"):
        (out_dir / png).unlink()
    monkeypatch.setattr(demo.interp, "induction_score", interrupt)  # the first experiment
    (out_dir / "induction_scores.png").unlink()
    assert demo.main(["--run-dir", str(train_run), "--out-dir", str(out_dir)]) == 130
    assert capsys.readouterr().err == "\ninterp_demo: interrupted; no PNG was written yet\n"


def test_interp_demo_prefers_the_train_demo_run_to_its_own_fallback_run(train_run, tmp_path):
    """Both hold a checkpoint: --run-dir's is taken; the fallback's under <out-dir>/train only when it has none."""
    demo = import_demo("interp_demo")
    shutil.copytree(train_run / "checkpoints", tmp_path / "out" / "train" / "checkpoints")
    args = demo.build_parser().parse_args(["--run-dir", str(train_run), "--out-dir", str(tmp_path / "out")])
    assert demo.load(args, torch.device("cpu"))[1] == f"{train_run} (newest checkpoint)"
    args.run_dir = str(tmp_path / "no-run")
    assert demo.load(args, torch.device("cpu"))[1] == f"{tmp_path / 'out' / 'train'} (newest checkpoint)"


def test_interp_demo_fallback_training_takes_the_device_and_replaces_an_unfinished_run(
    tmp_path, monkeypatch, offline_hub
):
    """Offline with no checkpoint anywhere: the short run trains on --device, and an earlier fallback
    run stopped before its first checkpoint (its metrics.jsonl alone) is started afresh, not refused."""
    demo = import_demo("interp_demo")
    fallback = tmp_path / "out" / "train"
    fallback.mkdir(parents=True)
    (fallback / "metrics.jsonl").write_text('{"step": 0}\n')
    started = []

    class Trainer(demo.Trainer):
        def run(self):
            started.append((self.cfg.device, self.step))
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "Trainer", Trainer)
    argv = ["--run-dir", str(tmp_path / "no-run"), "--out-dir", str(tmp_path / "out"), "--device", "cpu"]
    assert demo.main([*argv, "--train-steps", "2"]) == 130
    assert started == [("cpu", 0)]
    assert not (fallback / "metrics.jsonl").exists()  # the unfinished run's, deleted


@pytest.mark.parametrize("model", ["gpt2", "someone/a-model", "no/such/dir"])
def test_interp_demo_reports_a_model_it_cannot_load_in_one_line(model, offline_hub, tmp_path, capsys):
    """Before: a traceback for a hub id offline, as generate_demo said in one line."""
    demo = import_demo("interp_demo")
    assert demo.main(["--model", model, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"interp_demo: could not load {model!r}: ") and err.count("\n") == 1
    reason = (
        "no checkpoint directory at" if model == "no/such/dir" else "is not a local directory, and the Hugging Face"
    )
    assert reason in err
    assert not (tmp_path / "out").exists()


def test_interp_demo_refuses_a_one_layer_model(tmp_path, capsys):
    Transformer(dataclasses.replace(SMALL, n_layers=1)).save(tmp_path / "one-layer")
    demo = import_demo("interp_demo")
    assert demo.main(["--model", str(tmp_path / "one-layer"), "--out-dir", str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err
        == f"interp_demo: induction heads need at least 2 layers; {tmp_path / 'one-layer'} has 1\n"
    )
    assert not (tmp_path / "out").exists()


def test_interp_demo_refuses_a_model_without_the_tokens_of_its_texts(tmp_path, capsys):
    """Before: a traceback from the model's token check, after the induction experiment had run."""
    model_dir = tmp_path / "small-vocab"
    Transformer(dataclasses.replace(SMALL, d_vocab=1000)).save(model_dir)
    demo = import_demo("interp_demo")
    argv = ["--model", str(model_dir), "--out-dir", str(tmp_path / "out")]
    assert demo.main(argv) == 2
    assert capsys.readouterr().err == (
        f"interp_demo: --prompt has token id 38201, outside the vocabulary of {model_dir} (d_vocab=1000); the demo's "
        "texts are GPT-2 tokens: use a model of GPT-2's vocabulary, or texts it has tokens for\n"
    )
    assert not (tmp_path / "out").exists()
    short_texts = ["--prompt", "a b", "--clean", "a b", "--corrupted", "b a", "--answers", " Romeo", " a"]
    assert demo.main([*argv, *short_texts]) == 2
    assert capsys.readouterr().err.startswith("interp_demo: --answers has token id 43989, outside the vocabulary")


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
    "demo, flags",
    [
        ("train_demo", {"out_dir": "--out-dir=~/run", "cache_dir": "--cache-dir=~/tokens"}),
        ("generate_demo", {"run_dir": "--run-dir=~/run"}),
        ("interp_demo", {"run_dir": "--run-dir=~/run", "out_dir": "--out-dir=~/plots"}),
    ],
)
def test_directory_options_expand_home(demo, flags, home):
    """The shell leaves "~" alone after "=" (--out-dir=~/run), so the demo expands it: before, it made
    a directory named "~" in the working directory."""
    parsed = vars(import_demo(demo).build_parser().parse_args(list(flags.values())))
    assert {name: parsed[name] for name in flags} == {
        name: str(home / flag.split("~/")[1]) for name, flag in flags.items()
    }


@pytest.mark.parametrize(
    ("demo", "flag"),
    [
        ("train_demo", "--out-dir"),
        ("train_demo", "--cache-dir"),
        ("generate_demo", "--run-dir"),
        ("interp_demo", "--out-dir"),
    ],
)
def test_an_empty_directory_option_is_refused_not_taken_for_the_working_directory(demo, flag, capsys):
    """Before: --out-dir "$UNSET" wrote the run into the working directory."""
    with pytest.raises(SystemExit) as exit_info:
        import_demo(demo).build_parser().parse_args([flag, ""])
    assert exit_info.value.code == 2
    assert f"argument {flag}: empty path; name a directory ('.' for the working directory)" in capsys.readouterr().err


def test_generate_demo_names_an_empty_model_as_given(capsys):
    """Before: "could not load '<the --run-dir>'", since the empty --model was taken for none given."""
    assert import_demo("generate_demo").main(["--model", ""]) == 2
    assert capsys.readouterr().err == (
        "generate_demo: could not load '': name_or_path is an empty path; name one ('.' for the working directory)\n"
    )


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


# Run as a script: logging's configuration is per process, and pytest's own handlers would hide the
# demos' (logging.basicConfig does nothing where the root logger has handlers).
LOGGING_PROBE = """
import importlib.util, logging, sys
from huggingface_hub.utils import logging as hub_logging
from datasets.utils import logging as datasets_logging

name, path = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location(name, path)
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def speak(*args, **kwargs):  # in place of the work that logs: the trainer, or the model's loading
    logging.getLogger("gpt2_small.data").info("tokenization skipped")
    hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    datasets_logging.get_logger("datasets.load").warning("a datasets warning")
    logging.getLogger("httpx").info("HTTP Request: HEAD https://huggingface.co/x 200 OK")
    raise ValueError("stop")


if name == "train_demo":
    demo.Trainer = speak
else:
    demo.load = speak
sys.exit(demo.main(sys.argv[3:]))
"""


@pytest.mark.parametrize(
    "demo, rank", [("train_demo", "0"), ("train_demo", "1"), ("generate_demo", "0"), ("interp_demo", "0")]
)
def test_demos_print_each_library_warning_once_and_no_http_request_lines(demo, rank, tmp_path):
    """Before: the root logger's handler printed huggingface_hub's and datasets' warnings a second
    time beside their own handlers (offline, each of the hub's retries twice), and train_demo's, at
    INFO, a line for every HTTP request a hub dataset made. Under torchrun, every rank logged at
    INFO: each said it had read the token cache, where only rank 0 is to report progress."""
    args = ["--run-dir", str(tmp_path / "none")] if demo == "generate_demo" else ["--out-dir", str(tmp_path / "out")]
    cmd = [sys.executable, "-c", LOGGING_PROBE, demo, str(REPO / "demos" / f"{demo}.py"), *args]
    env = offline_env() | {"RANK": rank}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    # the others log gpt2_small's warnings only, as train_demo does on ranks other than 0
    ours = ["tokenization skipped"] if demo == "train_demo" and rank == "0" else []
    refusal = "generate_demo: could not load " + repr(str(tmp_path / "none")) if demo == "generate_demo" else demo
    assert result.stderr.splitlines() == [
        *ours,
        "Retrying in 1s [Retry 1/5].",
        "a datasets warning",
        f"{refusal}: stop",
    ]
