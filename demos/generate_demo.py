"""Sample from GPT-2: a trained model next to a random one, several temperatures, top-k, top-p,
greedy against sampling, beam search, and streaming, in one run.

    python demos/generate_demo.py                          # newest train_demo checkpoint, else gpt2 from the hub
    python demos/generate_demo.py --model gpt2-medium      # any hub id (online)
    python demos/generate_demo.py --model path/to/hf_dir   # a save_pretrained directory
    python demos/generate_demo.py --model runs/train_demo  # a training run (its newest checkpoint)
    python demos/generate_demo.py --prompt "JULIET:" --temperature 0.7 --top-k 40 --seed 1

With no --model it takes the newest checkpoint under runs/train_demo, then tries `gpt2` from the
Hugging Face Hub; when neither can be had it says so in one line and goes on with a random model.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from demos._cli import TRAIN_RUN, HelpFormatter, configure_logging, user_path  # noqa: E402
from gpt2_small import (  # noqa: E402
    EOT_ID,
    SamplingSettings,
    Transformer,
    TransformerConfig,
    beam_search,
    generate_text,
    get_tokenizer,
    load_model,
    stream_text,
    to_tokens,
)
from gpt2_small.sampling import check_seed  # noqa: E402
from gpt2_small.training import latest_checkpoint, pick_device  # noqa: E402
from solution import check_count  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--model",
        default=None,
        help="hub id (gpt2, gpt2-medium, ...), a Hugging Face directory, a Transformer.save directory, or a "
        "train_demo --out-dir (default: runs/train_demo if it has a checkpoint, else gpt2 from the hub)",
    )
    parser.add_argument("--prompt", default="ROMEO:", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate per sample")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="temperature of the sampled examples (0 = greedy)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="top-k of the sampled examples (default: off)")
    parser.add_argument(
        "--top-p", type=float, default=None, help="top-p (nucleus) of the sampled examples (default: off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for every sample")
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu) or a torch device")
    parser.add_argument(
        "--run-dir",
        type=user_path,
        default=str(TRAIN_RUN),
        help="the train_demo --out-dir tried when --model is not given",
    )
    return parser


def load(spec: str | None, run_dir: Path, device: torch.device) -> tuple[Transformer, str]:
    """The model and a one-line description of where it came from."""
    if spec is not None:
        return load_model(spec, device=device), spec
    # Only a run with no checkpoint falls back: a broken newest one is an error to report, where
    # catching load_model's FileNotFoundError once swapped it for a random model without a word.
    newest = latest_checkpoint(run_dir)
    if newest is not None:
        return load_model(newest, device=device), f"{newest} (newest train_demo checkpoint)"
    try:
        return load_model("gpt2", device=device), "gpt2 (Hugging Face Hub)"
    except OSError:
        print("no train_demo checkpoint and no network for gpt2 from the hub: using a random GPT-2 small "
              "(run demos/train_demo.py first for a trained one)")  # fmt: skip
        torch.manual_seed(0)
        return Transformer(TransformerConfig()).to(device).eval(), "random GPT-2 small"


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)))


def show(label: str, text: str, prompt: str) -> None:
    print(f"[{label}] {prompt}" + text[len(prompt) :].replace("\n", "\n    "))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.WARNING)
    try:
        return run(args)
    except KeyboardInterrupt:
        # The newline ends a half-streamed line, so the shell prompt does not land after it.
        print("\ngenerate_demo: interrupted", file=sys.stderr)
        return 130


def check_settings(args: argparse.Namespace, sampled: dict) -> SamplingSettings:
    """Refuse, with a ValueError, the settings that are wrong whatever the model: before it loads
    (gpt2 from the hub is a 500 MB download), not after."""
    settings = SamplingSettings(**sampled)  # top_k's upper bound waits for the model's d_vocab
    check_seed(args.seed)
    if args.seed == 2**64 - 1:  # the last section's second sample takes seed + 1
        raise ValueError(f"seed {args.seed} leaves no seed + 1 for the second sample; pass a smaller one")
    check_count("max_new_tokens", args.max_new_tokens, 0)
    if args.max_new_tokens == 0:  # generate returns the bare prompt; beam search (section 4) refuses 0
        raise ValueError("max_new_tokens=0 leaves nothing to show; ask for at least 1")
    if args.prompt == "":  # any other text is at least one token
        raise ValueError("the prompt is empty; use '<|endoftext|>' for an unconditional sample")
    return settings


def run(args: argparse.Namespace) -> int:
    sampled = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    try:
        settings = check_settings(args, sampled)
        device = pick_device(args.device)
    except ValueError as e:
        print(f"generate_demo: {e}", file=sys.stderr)
        return 2
    try:
        model, origin = load(args.model, Path(args.run_dir), device)
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        print(
            f"generate_demo: could not load {args.run_dir if args.model is None else args.model!r}: {e}",
            file=sys.stderr,
        )
        return 2
    tok = get_tokenizer()
    prompt, n = args.prompt, args.max_new_tokens
    print(f"model: {origin}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{model.num_params():,} parameters, on {device}")  # fmt: skip
    try:
        # What depends on the model is refused before any sample, not halfway through: top_k here,
        # the prompt's length by the first generation, the greedy one that two sections show.
        settings.check(model.cfg.d_vocab)
        if (largest := max(tok.encode(prompt, allowed_special="all"))) >= model.cfg.d_vocab:
            raise ValueError(
                f"--prompt has token id {largest}, outside the vocabulary of {origin} (d_vocab={model.cfg.d_vocab}); "
                "its text is GPT-2 tokens: use a model of GPT-2's vocabulary, or a prompt it has tokens for"
            )
        greedy = generate_text(model, tok, prompt, n, temperature=0)
        run_sections(model, tok, prompt, n, sampled, args.seed, greedy)
    except ValueError as e:  # bad settings: say which, without a traceback
        print(f"generate_demo: {e}", file=sys.stderr)
        return 2
    return 0


def run_sections(model: Transformer, tok, prompt: str, n: int, sampled: dict, seed: int, greedy: str) -> None:
    section("a random-init model of the same shape, for contrast")
    torch.manual_seed(seed)
    random_model = Transformer(model.cfg).to(model.device).eval()
    show("random, T=1", generate_text(random_model, tok, prompt, n, seed=seed), prompt)
    del random_model

    section("the same prompt at several temperatures")
    show("greedy (T=0)", greedy, prompt)
    for temperature in (0.5, 1.0, 1.5):
        show(f"T={temperature}", generate_text(model, tok, prompt, n, temperature=temperature, seed=seed), prompt)

    section("top-k and top-p (T=1)")
    for label, kw in [("top_k=10", dict(top_k=10)), ("top_k=100", dict(top_k=100)),
                      ("top_p=0.5", dict(top_p=0.5)), ("top_p=0.95", dict(top_p=0.95))]:  # fmt: skip
        show(label, generate_text(model, tok, prompt, n, seed=seed, **kw), prompt)

    section("greedy against sampling with your settings, and beam search")
    show("greedy", greedy, prompt)
    described = ", ".join(f"{k}={v}" for k, v in sampled.items() if v is not None)
    for s in (seed, seed + 1):
        show(f"{described}, seed {s}", generate_text(model, tok, prompt, n, seed=s, **sampled), prompt)
    beams = beam_search(model, to_tokens(prompt, device=model.device), num_beams=4, max_new_tokens=n,
                        no_repeat_ngram_size=3)  # fmt: skip
    best = beams.tokens[0].tolist()
    if best[-1] == EOT_ID:  # the beam ended itself; its text stops before <|endoftext|>, as the samples' do
        best.pop()
    show(f"beam search, 4 beams, no 3-gram repeats (log-prob {beams.log_probs[0]:.1f})", tok.decode(best), prompt)

    section(f"streaming ({described}), piece by piece as the tokens arrive")
    print(prompt, end="", flush=True)
    start = time.perf_counter()
    for piece in stream_text(model, tok, prompt, n, seed=seed, **sampled):
        print(piece, end="", flush=True)
    print(f"\n({n} tokens at most, {time.perf_counter() - start:.2f} s with the KV cache)")


if __name__ == "__main__":
    sys.exit(main())
