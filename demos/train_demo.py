"""Train GPT-2 on a text dataset: the bundled Shakespeare by default, offline, in minutes on a CPU.

    python demos/train_demo.py                                   # tiny model, Shakespeare, CPU-friendly
    python demos/train_demo.py --resume                          # continue the last run in --out-dir
    python demos/train_demo.py --dataset roneneldan/TinyStories --max-examples 20000
    python demos/train_demo.py --dataset my_corpus.jsonl --text-column body
    python demos/train_demo.py --preset gpt2 --dataset NeelNanda/pile-10k --batch-size 16 --compile
    torchrun --nproc_per_node=8 demos/train_demo.py --preset gpt2 ...   # DistributedDataParallel

Every TrainConfig field is a flag; see --help. Results land in --out-dir (default runs/train_demo in the repository):
checkpoints/, metrics.jsonl, loss_curve.png, samples.txt. demos/generate_demo.py loads the newest
checkpoint from there.
"""

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demos._cli import TRAIN_RUN, HelpFormatter, configure_logging, user_path  # noqa: E402
from gpt2_small.training import (  # noqa: E402
    PRESET_LR,
    PRESETS,
    RUN_FILES,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainingTerminated,
    latest_checkpoint,
    preset_unembedding,
)


def _unembedding_by_preset(name: str) -> str:
    """Each preset's default for `name` (tie_embeddings or unembed_bias), for the help text."""
    settings = {preset: preset_unembedding(preset)[name] for preset in PRESETS}
    return ", ".join(f"{preset} {'on' if on else 'off'}" for preset, on in sorted(settings.items()))


def _by_preset(index: int) -> str:
    """PRESET_LR's peak (0) or floor (1) learning rate of each preset, for the help text."""
    return ", ".join(f"{name} {rates[index]:.1e}" for name, rates in sorted(PRESET_LR.items()))


HELP = {
    "preset": f"model size: one of {sorted(PRESETS)}",
    "unembed_bias": "train the unembedding bias b_U (--no-unembed-bias keeps it 0, as GPT-2 has none, so that "
    f"gpt2_small.export_hf writes the trained model to Hugging Face's format exactly) (default by preset: "
    f"{_unembedding_by_preset('unembed_bias')})",
    "tie_embeddings": "train the unembedding as the embedding's transpose, W_U = W_E^T, one matrix as in GPT-2 and "
    "nanoGPT (124M parameters for --preset gpt2 where untied has 163M); checkpoints hold W_U as a copy "
    f"(default by preset: {_unembedding_by_preset('tie_embeddings')})",
    "dataset": "'shakespeare' (bundled), a Hugging Face dataset id, or a local .txt/.jsonl/.csv/.parquet file or folder",
    "text_column": "column holding the documents",
    "split": "split of the source dataset to read",
    "config_name": "configuration of the hub dataset, if it has several (default: the dataset's own)",
    "max_examples": "read only the first N documents (a hub dataset then streams them instead of downloading the split) (default: all)",
    "val_fraction": "last fraction of the token stream held out for validation",
    "stride": "window stride in tokens (default n_ctx; smaller gives overlapping windows, larger skips tokens)",
    "num_proc": "processes for tokenization (default: by dataset size)",
    "cache_dir": "token cache directory (default ~/.cache/gpt2_small/tokens)",
    "batch_size": "sequences per micro-batch, per process",
    "grad_accum": "micro-batches per optimizer step",
    "lr": f"peak learning rate (default by preset: {_by_preset(0)})",
    "min_lr": f"learning rate the cosine schedule decays to (default by preset: {_by_preset(1)}; lr / 10 when --lr is given)",
    "warmup_steps": "steps of linear warmup",
    "max_steps": "optimizer steps (ignored if --epochs is given)",
    "epochs": "train for this many passes over the training windows (default: none; --max-steps decides)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "weight_decay": "AdamW weight decay on weight matrices (W_*, embeddings included)",
    "grad_clip": "max gradient norm (0 disables)",
    "eval_interval": "steps between validation runs and loss-curve updates (0: only at the end)",
    "eval_batches": "validation batches per evaluation (all of the split, if it has fewer)",
    "sample_interval": "steps between printed samples (0: only before and after)",
    "sample_prompt": "prompt the samples continue",
    "sample_tokens": "new tokens per sample",
    "seed": "random seed for init, data order and samples",
    "device": "'auto' (cuda, then mps, then cpu) or a torch device such as cuda:1",
    "dtype": "'auto' (bf16 autocast on CUDA, float32 elsewhere), 'float32' or 'bfloat16'",
    "compile": "torch.compile the model",
    "fused_loss": "compute the unembedding and cross-entropy together, never storing the logits (faster, less memory)",
    "out_dir": "where checkpoints, metrics, plots and samples go",
    "overwrite": "start afresh in an --out-dir that holds an earlier run, deleting that run",
    "keep_checkpoints": "number of recent checkpoints to keep",
    "checkpoint_interval": "steps between checkpoints (0: at every evaluation and at the end)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Results land in --out-dir; generate from them with demos/generate_demo.py.",
        formatter_class=HelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # Optional[X] -> X
        if base is bool:  # None: the preset's
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
            continue
        kind = user_path if f.name.endswith("_dir") else base
        parser.add_argument(flag, type=kind, default=f.default, help=HELP[f.name])
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    parser.set_defaults(out_dir=str(TRAIN_RUN))  # the repository's runs/, where the other demos look
    return parser


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    resume = args.pop("resume")
    configure_logging(logging.INFO)
    try:
        cfg = TrainConfig(**args)
        trainer = Trainer(cfg, resume=resume)
        trainer.run()
    except KeyboardInterrupt as interrupt:
        # SIGTERM's is TrainingTerminated; the exit statuses are a shell's for each signal (128 + its number).
        how, status = (
            ("terminated (SIGTERM)", 143) if isinstance(interrupt, TrainingTerminated) else ("interrupted", 130)
        )
        if os.environ.get("RANK", "0") != "0":
            # Under torchrun rank 0 writes the checkpoint and says where; another rank, looking before
            # it was written, said there was none.
            return status
        # Interrupted while loading the data there is no checkpoint yet, unless an earlier run left one.
        last = latest_checkpoint(args["out_dir"])
        if last is None:
            wrote = any((Path(args["out_dir"]) / name).exists() for name in RUN_FILES)
            again = f"; start again with --overwrite (it deletes what {args['out_dir']} holds)" if wrote else ""
            print(f"{how} before any checkpoint was written; there is nothing to --resume{again}", file=sys.stderr)
        else:
            print(f"{how}; the newest checkpoint is {last} (continue with --resume)", file=sys.stderr)
        return status
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"train_demo: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"train_demo: training diverged at {e}", file=sys.stderr)
        return 1
    if trainer.dist.is_main:
        rows = trainer.rows
        val = [r["val_loss"] for r in rows if "val_loss" in r]
        unigram = next(r["unigram_val_loss"] for r in rows if "unigram_val_loss" in r)
        print(f"\nfinal validation loss {val[-1]:.3f} nats/token (unigram baseline {unigram:.3f})")
        print(f"outputs in {cfg.out_dir}: checkpoints/, metrics.jsonl, loss_curve.png, samples.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
