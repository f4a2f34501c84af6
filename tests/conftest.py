"""Reference fixtures: seeded random GPT-2 checkpoints in Hugging Face's format, the
TransformerLens 4 TransformerBridge booted on each, and our Transformer loaded from the same
files. Everything is built locally; nothing is fetched from a hub.

Parity assertions go through the `parity` fixture, which records the worst relative error per
component; the table is printed at the end of the run.
"""

import dataclasses
import math
from collections import defaultdict
from pathlib import Path

import jaxtyping
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_small import Transformer
from gpt2_small.tokenizer import hf_tokenizer

# The contract: ||ours - ref|| / ||ref|| <= REL_TOL, and torch.testing.assert_close's float32
# defaults (rtol 1.3e-6, atol 1e-5) elementwise.
REL_TOL = 1e-5
# Activations and logits of a whole forward pass carry every upstream layer's float32 rounding,
# which depends on the CPU's matrix-multiply kernels. After 12 layers with |resid| ~ 50, HF and
# the bridge already differ from each other by ~6e-5 elementwise, and our logits differ from
# HF's by 0.74e-5 to 1.38e-5 at the largest (18 token draws x both specs x AVX-512 and AVX2
# kernels), so assert_close's defaults pass or fail by the machine. Those are checked against a
# float64 run of the bridge instead: our RMS error may be at most DEEP_ERROR_RATIO times the
# float32 reference's own. The RMS, not the largest elementwise error: the ratio of two
# implementations' largest errors is an extreme of a few rounding events, and for some hook it
# reached 1.92 in those 72 runs; the RMS ratio of the worst hook stayed in [1.03, 1.31].
DEEP_ERROR_RATIO = 1.5


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_inner: int
    n_positions: int
    layer_norm_epsilon: float
    batch: int
    pos: int
    seed: int


SPECS = [
    Spec("gpt2-small-shape", 12, 768, 12, 3072, 1024, 1e-5, batch=2, pos=48, seed=0),
    # Odd on purpose: d_head 24, d_mlp not a multiple of d_model, a large eps, a short n_ctx.
    Spec("odd-3l-96d-4h", 3, 96, 4, 200, 64, 1e-3, batch=3, pos=37, seed=1),
]


@dataclasses.dataclass
class Reference:
    spec: Spec
    directory: Path
    hf: GPT2LMHeadModel
    bridge: object
    model: Transformer
    tokens: torch.Tensor
    cache: dict  # the bridge's ActivationCache
    cache64: dict  # the same run of the bridge in float64: the ground truth for deep activations
    logits: torch.Tensor  # the bridge's logits
    hf_logits: torch.Tensor
    bridge64: object  # the bridge in float64, for the ground truth of other inputs
    logits64: torch.Tensor  # its logits of `tokens`


def randomize_(hf: GPT2LMHeadModel, seed: int) -> None:
    """Replace GPT-2's init with weights that exercise every parameter.

    The stock init has zero biases and unit LayerNorm weights, under which a loader that
    dropped a bias or swapped w and b would still pass; and its tiny weights give nearly
    uniform attention. Here matrices have std 1.5/sqrt(d_model), so attention scores are
    O(1), and every bias and LayerNorm parameter is random.
    """
    gen = torch.Generator().manual_seed(seed)
    d_model = hf.config.n_embd
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(1.5 / math.sqrt(d_model) * noise)


def save_hf_checkpoint(spec: Spec, directory: Path) -> GPT2LMHeadModel:
    torch.manual_seed(spec.seed)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_inner=spec.n_inner,
        layer_norm_epsilon=spec.layer_norm_epsilon,
    )
    hf = GPT2LMHeadModel(config).eval()
    randomize_(hf, spec.seed)
    hf.save_pretrained(directory)
    hf_tokenizer().save_pretrained(directory)
    return hf


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory) -> Path:
    """Point the token cache and datasets' Arrow cache into the session's temp dir.

    Left at their defaults, every run writes into ~/.cache: datasets keys its cache on each data
    file's path, so each test's tmp_path and each clone of the repo leaves a new entry (22 MB
    for the bundled corpus) that nothing ever removes. The variables reach demo subprocesses;
    datasets.config is patched too because datasets derives its paths once, at import.
    """
    import datasets

    root = tmp_path_factory.mktemp("caches")
    arrow = root / "datasets"
    downloads = arrow / datasets.config.DOWNLOADED_DATASETS_DIR
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2_SMALL_CACHE", str(root / "gpt2_small"))
        mp.setenv("HF_DATASETS_CACHE", str(arrow))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", arrow)
        mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", downloads)
        mp.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", downloads / datasets.config.EXTRACTED_DATASETS_DIR)
        yield root


@pytest.fixture(scope="session", params=SPECS, ids=[s.name for s in SPECS])
def ref(request, tmp_path_factory) -> Reference:
    from transformer_lens.model_bridge import TransformerBridge

    spec: Spec = request.param
    directory = tmp_path_factory.mktemp(spec.name)
    hf = save_hf_checkpoint(spec, directory)
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
    model = Transformer.from_pretrained(directory)
    gen = torch.Generator().manual_seed(spec.seed + 100)
    tokens = torch.randint(0, 50257, (spec.batch, spec.pos), generator=gen)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens)
        hf_logits = hf(tokens).logits
        bridge64 = TransformerBridge.boot_transformers(str(directory), device="cpu", dtype=torch.float64)
        logits64, cache64 = bridge64.run_with_cache(tokens)
    return Reference(spec, directory, hf, bridge, model, tokens, cache, cache64, logits, hf_logits, bridge64, logits64)


_worst: dict[str, dict[str, float]] = defaultdict(dict)


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture
def parity():
    """parity(actual, expected, component, spec_name, truth=None): assert the contract, record the error.

    Without `truth`, elementwise closeness is assert_close's defaults. With `truth` (the
    float64 value), it is: ||actual - truth|| <= DEEP_ERROR_RATIO * ||expected - truth||.
    """

    def check(actual, expected, component: str, spec_name: str, truth=None) -> float:
        assert actual.shape == expected.shape, f"{component}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.dtype == expected.dtype, f"{component}: dtype {actual.dtype} != {expected.dtype}"
        rel = _rel_error(actual, expected)
        worst = _worst[component]
        worst[spec_name] = max(rel, worst.get(spec_name, 0.0))
        assert rel <= REL_TOL, f"{component} [{spec_name}]: relative error {rel:.3g} > {REL_TOL}"
        if truth is None:
            torch.testing.assert_close(actual, expected, msg=lambda m: f"{component} [{spec_name}]: {m}")
        else:
            ours = float((actual.double() - truth).norm())
            reference = float((expected.double() - truth).norm())
            assert ours <= DEEP_ERROR_RATIO * reference, (
                f"{component} [{spec_name}]: ||ours - float64|| = {ours:.3g} exceeds "
                f"{DEEP_ERROR_RATIO} x the float32 reference's {reference:.3g}"
            )
        return rel

    return check


def pytest_terminal_summary(terminalreporter):
    if not _worst:
        return
    specs = sorted({s for by_spec in _worst.values() for s in by_spec})
    tr = terminalreporter
    tr.section("worst relative error ||ours - ref|| / ||ref|| per component (float32)")
    tr.write_line(f"{'component':<34}" + "".join(f"{s:>20}" for s in specs))
    for component in sorted(_worst):
        row = "".join(f"{_worst[component].get(s, float('nan')):>20.2e}" for s in specs)
        tr.write_line(f"{component:<34}{row}")


TINY_SPEC = Spec("tiny", 2, 32, 4, 64, 24, 1e-5, batch=2, pos=11, seed=7)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, GPT2LMHeadModel]:
    """A small randomised GPT2LMHeadModel saved with save_pretrained (safetensors) + tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-hf")
    return directory, save_hf_checkpoint(TINY_SPEC, directory)


@dataclasses.dataclass
class SamplingPair:
    """An HF GPT2LMHeadModel and our Transformer on the same randomised weights."""

    hf: GPT2LMHeadModel
    model: Transformer
    eos: int


def _sampling_pair(directory: Path, vocab_size: int, seed: int) -> SamplingPair:
    torch.manual_seed(seed)
    eos = vocab_size - 1  # for the full vocabulary, GPT-2's own 50256
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=eos, eos_token_id=eos
    )
    hf = GPT2LMHeadModel(config).eval()
    randomize_(hf, seed)
    hf.save_pretrained(directory)
    return SamplingPair(hf, Transformer.from_pretrained(directory), eos)


@pytest.fixture(scope="session")
def sampling_pair(tmp_path_factory) -> SamplingPair:
    """Full 50257-token vocabulary, 2 layers, n_ctx 128: for greedy, padding and cache checks."""
    return _sampling_pair(tmp_path_factory.mktemp("sampling-hf"), 50257, seed=11)


@pytest.fixture(scope="session")
def small_vocab_pair(tmp_path_factory) -> SamplingPair:
    """A 100-token vocabulary with eos = 99, so that eos is sampled often (beam search ends)."""
    return _sampling_pair(tmp_path_factory.mktemp("sampling-hf-small"), 100, seed=12)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path) -> None:
    """The Hugging Face Hub offline, with an empty cache: a hub id is then refused with an OSError at
    once, as on a machine with no network that has downloaded nothing."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture
def home(monkeypatch, tmp_path) -> Path:
    """A home directory of the test's own (HOME, which "~" expands to) and a working directory apart
    from it, where a path taken literally would make a directory named "~"."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home


@pytest.fixture
def without_shape_checks():
    """Turn jaxtyping's runtime shape checks off for one test, as in a user's code: torch.compile
    (dynamo) cannot trace the checker, and a wrongly typed argument would otherwise be refused by
    beartype before our own checks run. The other tests run the same modules with the checks on."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
