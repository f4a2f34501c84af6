"""Look inside a GPT-2: attention patterns, the logit lens, induction heads, activation patching and
K-composition, written as PNGs, with the top induction heads printed.

    python demos/interp_demo.py                          # train_demo checkpoint, else gpt2, else a short training run
    python demos/interp_demo.py --model gpt2             # GPT-2 small from the hub (online)
    python demos/interp_demo.py --model runs/train_demo --out-dir runs/interp_demo

With no --model it takes the newest checkpoint under runs/train_demo, then tries `gpt2` from the
Hugging Face Hub; when neither can be had it says so in one line and trains the tiny model for
--train-steps steps on the embedded Shakespeare first (a few minutes on a CPU; the checkpoint is
kept under <out-dir>/train and reused next time).
"""

import argparse
import copy
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from demos._cli import TRAIN_RUN, HelpFormatter, configure_logging, user_path  # noqa: E402
from gpt2_small import (  # noqa: E402
    Transformer,
    interp,  # noqa: E402
    load_model,
    process_weights,
    to_single_token,
    to_str_tokens,
    to_tokens,
)
from gpt2_small.data import check_directory_path  # noqa: E402
from gpt2_small.training import TrainConfig, Trainer, latest_checkpoint, pick_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINE = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
CLEAN = "When Romeo and Juliet went to the market, Juliet gave a rose to"
CORRUPTED = "When Romeo and Juliet went to the market, Romeo gave a rose to"
ANSWERS = (" Romeo", " Juliet")  # the clean run should prefer the first, the corrupted the second


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None, help="hub id, Hugging Face directory, Transformer.save directory "
                        "or train_demo --out-dir (default: runs/train_demo, else gpt2, else a short training run)")  # fmt: skip
    parser.add_argument("--run-dir", type=user_path, default=str(TRAIN_RUN), help="train_demo run tried first")
    parser.add_argument(
        "--out-dir", type=user_path, default=str(ROOT / "runs" / "interp_demo"), help="where the PNGs go"
    )
    parser.add_argument("--prompt", default=f"{LINE} {LINE}", help="text for the attention and logit-lens plots")
    parser.add_argument("--clean", default=CLEAN, help="clean prompt of the patching experiment")
    parser.add_argument("--corrupted", default=CORRUPTED, help="corrupted prompt (same token count as --clean)")
    parser.add_argument("--answers", nargs=2, default=list(ANSWERS), metavar=("CLEAN_ANSWER", "CORRUPTED_ANSWER"),
                        help="single-token answers whose logit difference the patching measures")  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=300, help="steps of the fallback training run")
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu) or a torch device")
    return parser


def load(args, device: torch.device) -> tuple[Transformer, str]:
    """The model and a one-line description of where it came from."""
    if args.model is not None:
        return load_model(args.model, device=device), args.model
    fallback = Path(args.out_dir) / "train"
    for run in (Path(args.run_dir), fallback):
        if latest_checkpoint(run) is not None:
            return load_model(run, device=device), f"{run} (newest checkpoint)"
    try:
        return load_model("gpt2", device=device), "gpt2 (Hugging Face Hub)"
    except OSError:
        print(f"no train_demo checkpoint and no network for gpt2: training the tiny model for {args.train_steps} "
              f"steps on Shakespeare first ({fallback})")  # fmt: skip
    cfg = TrainConfig(max_steps=args.train_steps, out_dir=str(fallback), eval_interval=0, sample_interval=0,
                      device=args.device, overwrite=True)  # fmt: skip
    Trainer(cfg).run()
    return load_model(fallback, device=device), f"{fallback} (tiny model, {args.train_steps} steps)"


def answer_token(text: str) -> int:
    try:
        return to_single_token(text)
    except ValueError as e:
        raise ValueError(f"--answers must be single tokens, for the logit difference: {e}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.WARNING)
    try:
        return run(args)
    except KeyboardInterrupt:
        # The PNGs are written one by one as each experiment ends, so those already there are complete.
        done = sorted(p.name for p in Path(args.out_dir).glob("*.png"))
        kept = f"PNGs in {args.out_dir}: {', '.join(done)}" if done else "no PNG was written yet"
        print(f"\ninterp_demo: interrupted; {kept}", file=sys.stderr)
        return 130


def tokens_of(text: str, flag: str, at_least: int) -> torch.Tensor:
    tokens = to_tokens(text) if text else torch.zeros(1, 0, dtype=torch.long)
    if tokens.shape[1] < at_least:
        n = tokens.shape[1]
        raise ValueError(f"{flag} {text!r} is {n} token{'' if n == 1 else 's'}; it needs at least {at_least}")
    return tokens


def run(args: argparse.Namespace) -> int:
    try:
        # Every argument is checked before the model loads, which may mean a fallback training run.
        check_directory_path(args.out_dir, "--out-dir")
        if args.train_steps < 1:
            raise ValueError(f"--train-steps must be >= 1, got {args.train_steps}")
        prompt = tokens_of(args.prompt, "--prompt", at_least=2)  # the logit lens scores each next token
        clean, corrupted = tokens_of(args.clean, "--clean", 1), tokens_of(args.corrupted, "--corrupted", 1)
        if clean.shape != corrupted.shape:
            raise ValueError(f"--clean is {clean.shape[1]} tokens, --corrupted {corrupted.shape[1]}; they must match")
        good, bad = (answer_token(a) for a in args.answers)
        if good == bad:
            raise ValueError(
                f"--answers {args.answers[0]!r} and {args.answers[1]!r} are the same token ({good}); their logit "
                f"difference is 0 in every run, so there is nothing to patch or attribute"
            )
        device = pick_device(args.device)
        try:
            model, source = load(args, device)
        except OSError as e:  # a hub id offline or unknown to the hub, a missing directory: no traceback
            raise ValueError(f"could not load {'a model' if args.model is None else repr(args.model)}: {e}") from None
        cfg = model.cfg
        if cfg.n_layers < 2:
            raise ValueError(f"induction heads need at least 2 layers; {source} has {cfg.n_layers}")
        if clean.shape[1] > cfg.n_ctx:
            raise ValueError(f"--clean and --corrupted are {clean.shape[1]} tokens, more than n_ctx={cfg.n_ctx}")
        # The texts are GPT-2 tokens; a model of a smaller vocabulary has no row for most of them.
        used = {"--prompt": prompt[:, : cfg.n_ctx], "--clean": clean, "--corrupted": corrupted,
                "--answers": torch.tensor([good, bad])}  # fmt: skip
        for flag, ids in used.items():
            if (largest := int(ids.max())) >= cfg.d_vocab:
                raise ValueError(
                    f"{flag} has token id {largest}, outside the vocabulary of {source} (d_vocab={cfg.d_vocab}); "
                    f"the demo's texts are GPT-2 tokens: use a model of GPT-2's vocabulary, or texts it has tokens for"
                )
    except (ValueError, FileNotFoundError) as e:
        print(f"interp_demo: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"model: {source}; {cfg.n_layers} layers x {cfg.n_heads} heads, n_ctx {cfg.n_ctx}, on {device}")

    # 1. Induction heads: repeated random tokens.
    seq_len = min(50, (cfg.n_ctx - 1) // 2)
    scores = interp.induction_score(model, seq_len=seq_len, batch=8)
    interp.plot_induction_scores(scores, title=f"induction score (repeated random tokens, {seq_len} each)",
                                 path=out / "induction_scores.png")  # fmt: skip
    top = interp.top_heads(scores, k=5)
    print(f"\ntop induction heads (1 = always attends to the token after the earlier copy; "
          f"uniform attention would give ~{1 / (1.5 * seq_len):.2f}):")  # fmt: skip
    for name, score in top:
        print(f"  {name}: {score:.3f}")

    # 2. Attention patterns of the best induction head's layer on a repeated line of text.
    tokens = prompt[:, : cfg.n_ctx].to(device)
    labels = to_str_tokens(tokens[0])
    best_layer, best_head = (int(part) for part in top[0][0][1:].split("H"))  # "L{layer}H{head}"
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    interp.plot_attention_patterns(cache["pattern", best_layer][0], labels, title=f"layer {best_layer} attention",
                                   path=out / f"attention_layer{best_layer}.png")  # fmt: skip

    # 3. Logit lens: how early each position's next token becomes likely.
    lens = interp.logit_lens(model, tokens)
    next_log_probs = lens.log_probs_of(tokens[:, 1:])[:, 0]
    interp.plot_logit_lens(next_log_probs, lens.labels, labels[1:], path=out / "logit_lens.png")
    final = next_log_probs[-1]
    first_half, second_half = final[: len(final) // 2].mean(), final[len(final) // 2 :].mean()
    print(f"\nmean log-prob of the next token: first copy of the line {first_half:.2f}, second copy "
          f"{second_half:.2f} (a model with induction heads predicts the second copy far better)")  # fmt: skip

    # 4. Activation patching: which positions and heads carry "who gets the rose".
    clean, corrupted = clean.to(device), corrupted.to(device)
    with torch.no_grad():
        clean_last, corrupted_last = model(clean)[0, -1], model(corrupted)[0, -1]
    clean_diff = float(clean_last[good] - clean_last[bad])
    corrupted_diff = float(corrupted_last[good] - corrupted_last[bad])

    # Logit difference recovered, in nats: 0 = as corrupted, clean_diff - corrupted_diff = fully clean.
    # (Not divided by that gap, which a model that ignores the change makes ~0.)
    def recovered(patched_logits: torch.Tensor) -> torch.Tensor:
        return patched_logits[0, -1, good] - patched_logits[0, -1, bad] - corrupted_diff

    gap = clean_diff - corrupted_diff
    by_position = interp.activation_patching(model, clean, corrupted, recovered)
    interp.plot_patching(by_position, token_labels=to_str_tokens(clean[0]),
                         title=f"patching resid_pre: logit diff recovered (clean = {gap:+.2f})",
                         path=out / "patching_resid_pre.png")  # fmt: skip
    by_head = interp.activation_patching(model, clean, corrupted, recovered, by="head")
    interp.plot_patching(by_head, by="head", title=f"patching each head's z: logit diff recovered (clean = {gap:+.2f})",
                         path=out / "patching_heads.png")  # fmt: skip
    print(f"\nlogit difference {args.answers[0]!r} - {args.answers[1]!r}: clean {clean_diff:.2f}, "
          f"corrupted {corrupted_diff:.2f}")  # fmt: skip
    if abs(gap) < 0.1:
        print("the model barely tells the two prompts apart, so the patching maps show little")
    print("heads whose clean z recovers the most:", ", ".join(f"{n} {v:+.2f}" for n, v in interp.top_heads(by_head, 3)))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    dla = interp.direct_logit_attribution(model, clean_cache, good, bad)
    print("direct logit attribution, largest components:", ", ".join(f"{n} {v:+.2f}" for n, v in dla.top(5)))

    # 5. K-composition: whose output the best induction head's keys read. In a model with an induction
    # circuit those are its previous-token heads. Scored, as TransformerLens does, on weights with the
    # LayerNorms folded in (on a copy: the loaded model stays as it is).
    composition = process_weights(copy.deepcopy(model)).all_composition_scores("K")
    interp.plot_composition_scores(composition, mode="K", title="K-composition scores (LayerNorms folded in)",
                                   path=out / "composition_K.png")  # fmt: skip
    if best_layer > 0:
        readers = interp.top_heads(composition[:best_layer, :, best_layer, best_head], 3)
        print(f"\nheads whose output {top[0][0]}'s keys read most (K-composition; random heads score about "
              f"{cfg.d_model**-0.5:.3f}):", ", ".join(f"{n} {v:.3f}" for n, v in readers))  # fmt: skip
    else:
        print(f"\n{top[0][0]} is in layer 0: no earlier head's output reaches its keys")
    print(f"\nPNGs in {out}: " + ", ".join(sorted(p.name for p in out.glob("*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
