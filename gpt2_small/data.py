"""Text datasets -> GPT-2 token stream -> fixed-length training windows.

Three sources, all through Hugging Face `datasets`:

- "shakespeare" (the default): the 42 works bundled in the package, one document per work;
  it needs no network.
- a local file or directory: .txt / .txt.gz (one document per file), .jsonl / .json (gzipped too),
  .csv (with a header row; gzipped too), .parquet.
- any hub dataset id when online, e.g. "roneneldan/TinyStories" or "NeelNanda/pile-10k"; with
  `max_examples`, only those first documents are streamed, not the whole split downloaded.

Documents are tokenized with the GPT-2 encoding (`datasets.map`, batched, `num_proc` workers)
and joined with <|endoftext|> after each. The stream is stored as uint16 (every GPT-2 id fits)
in a .npy cache keyed by the dataset's fingerprint, so a second run skips tokenization.
Train/val is a deterministic tail split of the stream: the last `val_fraction` is validation.
"""

import hashlib
import json
import logging
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from gpt2_small.assets import asset_path, sha256_of
from gpt2_small.tokenizer import EOT_ID, TOKENIZER_ASSET, get_tokenizer
from gpt2_small.weights import hub_error_text, hub_errors
from solution import _atomic_write, check_count, check_flag, file_in_the_way, spelled_as_path, user_path

logger = logging.getLogger(__name__)

EMBEDDED_DATASET = "shakespeare"
# By the whole suffix, so that a gzipped JSON Lines file goes to the json builder (which reads
# gzip); a bare .gz is one text document, as before.
_TEXT_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".txt.gz": "text",
    ".text.gz": "text",
    ".gz": "text",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
}
# Each bundled work opens "TITLE\n\nby William Shakespeare" (one newline for the Sonnets).
_SHAKESPEARE_WORK = re.compile(r"\n+(?=[^\n]+\n\n?by William Shakespeare\n)")
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    # Set but empty counts as unset, as for XDG's variables: Path("") would be the working directory.
    root = os.environ.get("GPT2_SMALL_CACHE") or Path.home() / ".cache" / "gpt2_small"
    return Path(root).expanduser() / "tokens"


def check_directory_path(path: str | os.PathLike, what: str) -> None:
    """Refuse a path that cannot become a directory, it or a folder above it being a file.

    Called before long work (a download, tokenization), which would otherwise end in errno 17 or
    20 at the first write.
    """
    path = user_path(path, what)
    if (why := file_in_the_way(path)) is not None:
        raise ValueError(f"{what} {str(path)!r} {why}; choose a directory (it is created if missing)")


def load_text_dataset(
    source: str = EMBEDDED_DATASET,
    *,
    text_column: str = "text",
    split: str = "train",
    config_name: str | None = None,
    max_examples: int | None = None,
):
    """A `datasets.Dataset` with one document per row in `text_column`."""
    import datasets

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a dataset's name or a path, got {type(source).__name__}")
    # Else 2.5 was taken (and failed in range() on a longer dataset), and "3" failed in a comparison.
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)):
        raise TypeError(f"max_examples must be an int or None, got {max_examples!r}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    source = os.fspath(source)  # a Path names a local file or folder, as its str does
    if source == "":  # Path("") is the working directory, which was then read as a local dataset
        raise ValueError(f"source is empty; name {EMBEDDED_DATASET!r}, a hub dataset or a local path")
    path = Path(source).expanduser()
    _refuse_options_that_do_not_apply(source, path, text_column=text_column, split=split, config_name=config_name)
    if source == EMBEDDED_DATASET:
        ds = datasets.load_dataset(
            "text", data_files=str(asset_path("shakespeare.txt.gz")), sample_by="document", split="train"
        )
        ds = ds.map(
            lambda batch: {"text": [w for doc in batch["text"] for w in _SHAKESPEARE_WORK.split(doc)]}, batched=True
        )
        text_column = "text"
    elif path.exists():
        ds = _load_local(path, split)
    elif _names_a_path(source):
        # Asking the hub for it would only retry for ~20 s and then fail, or worse, find a dataset.
        raise FileNotFoundError(
            f"no such file or directory: {source!r}, looked for at {path.absolute()} (a hub dataset is named "
            f"'owner/name', as roneneldan/TinyStories)"
        )
    elif max_examples is None:
        ds = _load_hub(source, config_name, split)
    else:
        ds = _stream_hub(source, config_name, split, max_examples, text_column)

    if text_column not in ds.column_names:
        raise ValueError(f"dataset {source!r} has no text column {text_column!r}; its columns are {ds.column_names}")
    if len(ds) == 0:  # before the type check: an empty stream's column has no type to name
        raise ValueError(f"dataset {source!r} (split {split!r}) is empty")
    _check_text_column(ds, text_column)  # here, while the other columns are there to be named
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    return ds.select_columns([text_column])


def _refuse_options_that_do_not_apply(source: str, path: Path, **given) -> None:
    """Name the options a source cannot honour, rather than read the same data whatever they say."""
    if source == EMBEDDED_DATASET:
        defaults = {"text_column": "text", "split": "train", "config_name": None}
        what = f"the bundled {source!r} has one split, 'train', one text column, 'text', and no configurations"
        fix = ""
    elif path.exists():
        defaults = {"split": "train", "config_name": None}  # `split` only names the one split made
        what = f"a local file or folder ({source}) is read whole, as one split, and has no configurations"
        fix = ", and point the dataset at the files you mean"
    else:
        return
    off = [f"{name}={given[name]!r} (--{name.replace('_', '-')})" for name in defaults if given[name] != defaults[name]]
    if off:
        raise ValueError(
            f"{what}: {' and '.join(off)} cannot apply; leave {'it' if len(off) == 1 else 'them'} out{fix}"
        )


def _names_a_path(source: str) -> bool:
    """Whether `source` can only be a path: spelled as one (solution.spelled_as_path, as load_model
    decides), or ending in a data file's suffix, which no hub id does."""
    return spelled_as_path(source) or _suffix(Path(source)) in _TEXT_SUFFIXES


def _suffix(path: Path) -> str:
    """The suffix that names a file's format: ".jsonl.gz" for a gzipped one, else the last."""
    both = Path(path.stem).suffix + path.suffix
    return both if path.suffix == ".gz" and both in _TEXT_SUFFIXES else path.suffix


def _load_local(path: Path, split: str):
    import datasets

    if path.is_dir():
        # Hidden files and folders (.DS_Store, .ipynb_checkpoints/, .git/) are an editor's or a
        # tool's, not documents; .ipynb_checkpoints would silently duplicate them.
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    else:
        files = [path]
    builders = {_TEXT_SUFFIXES.get(_suffix(p)) for p in files}
    if len(builders) != 1 or None in builders:
        kinds = sorted({_suffix(p) for p in files}) or ["no files"]
        raise ValueError(
            f"{path}: expected .txt/.txt.gz, .jsonl/.json(.gz), .csv(.gz) or .parquet files of one kind, found {kinds}"
        )
    builder = builders.pop()
    data_files = [str(p) for p in files]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files={split: data_files}, split=split, **kwargs)
    except StopIteration:  # datasets' json builder reads a first row to learn the columns
        raise ValueError(f"{path}: holds no JSON rows; it is empty") from None
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:  # pyarrow's errors are ValueErrors
        cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e
        hint = "; text files must be UTF-8" if isinstance(cause, UnicodeDecodeError) else ""
        raise ValueError(f"{path}: could not read it as {builder} ({type(cause).__name__}: {cause}){hint}") from e


def _load_hub(source: str, config_name: str | None, split: str, streaming: bool = False):
    import datasets
    from huggingface_hub import constants

    try:
        return datasets.load_dataset(source, config_name, split=split, streaming=streaming)
    # OSError covers the hub's own: an offline ConnectionError, a FileNotFoundError, and the hub's
    # DatasetNotFoundError for an unknown id, which derives from FileNotFoundError; httpx's
    # transport errors (a dropped connection) are no OSError.
    except hub_errors() as e:
        offline = " (offline mode is on)" if constants.HF_HUB_OFFLINE else ""
        # The hub's own words: "unknown" alone hid a gated dataset's "You must be authenticated to access it".
        raise ValueError(
            f"could not load dataset {source!r}{offline}: it is not a local file or directory, and the Hugging Face "
            f"Hub could not provide it ({hub_error_text(e)}). Offline, use the "
            f"bundled {EMBEDDED_DATASET!r} or a local .txt/.jsonl/.csv/.parquet file."
        ) from e


def _stream_hub(source: str, config_name: str | None, split: str, max_examples: int, text_column: str):
    """The first max_examples documents of a hub dataset, streamed: a prepared dataset would need
    the whole split downloaded first (tens of GB for a web corpus) to keep a few of its rows.

    The rows become an in-memory Dataset, whose fingerprint hashes its content, so the token
    cache is hit again only for the same documents.
    """
    import datasets

    texts = []
    rows = _load_hub(source, config_name, split, streaming=True).take(max_examples)
    try:
        for row in tqdm(rows, total=max_examples, desc=f"streaming {source}", unit="doc"):
            if text_column not in row:
                raise ValueError(f"dataset {source!r} has no text column {text_column!r}; its columns are {list(row)}")
            value = row[text_column]
            if value is not None and not isinstance(value, str):
                # Here, while the row's other columns can be named: the Dataset made below has this one alone.
                raise ValueError(
                    f"the text column {text_column!r} holds {reprlib.repr(value)} ({type(value).__name__}) in row "
                    f"{len(texts):,}, not a string; name the column of documents with text_column (--text-column); "
                    f"the columns are {list(row)}"
                )
            texts.append(value)
    except hub_errors() as e:  # the connection lost mid-stream: a traceback from deep in datasets before
        raise ValueError(
            f"streaming {source!r} stopped after {len(texts):,} of {max_examples:,} documents ({hub_error_text(e)}); "
            f"nothing was kept: run again once the Hugging Face Hub can be reached"
        ) from e
    return datasets.Dataset.from_dict({text_column: texts})


def _cache_key(ds, text_column: str) -> str:
    payload = {
        "version": _CACHE_VERSION,
        "fingerprint": ds._fingerprint,
        "rows": len(ds),
        "column": text_column,
        "tokenizer": sha256_of(asset_path(TOKENIZER_ASSET)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _encode_batch(batch: Mapping[str, list], text_column: str) -> dict[str, list]:
    """Each document's ids and <|endoftext|>; a null document (a missing value) gives no tokens at all."""
    texts = batch[text_column]
    encoded = iter(get_tokenizer().encode_ordinary_batch([text for text in texts if text is not None]))
    ids = [[] if text is None else next(encoded) + [EOT_ID] for text in texts]
    return {"ids": ids, "n": [len(x) for x in ids]}


def _check_text_column(ds, text_column: str) -> None:
    import datasets

    feature = ds.features[text_column]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return
    if (odd := _first_non_string(ds, text_column, feature)) is not None:
        # datasets 5 reads a JSON column whose rows differ in type (a str here, a number there) as
        # Json, whose repr, "Json(decode=True)", named neither the row nor what it holds.
        row, value = odd
        raise ValueError(
            f"the text column {text_column!r} holds values of several JSON types, and row {row:,} holds "
            f"{reprlib.repr(value)} ({type(value).__name__}), not a string; make every document a string (or null)"
        )
    held = f"{feature.dtype} values" if isinstance(feature, datasets.Value) else repr(feature)
    raise ValueError(
        f"the text column {text_column!r} holds {held}, not strings; name the column of documents with "
        f"text_column (--text-column); the columns are {ds.column_names}"
    )


def _first_non_string(ds, text_column: str, feature) -> tuple[int, object] | None:
    """The first row of a mixed-type (Json) column whose value is neither a str nor null, and its value."""
    import datasets

    if not isinstance(feature, getattr(datasets, "Json", ())):  # datasets before 5 has no Json feature
        return None
    start = 0
    for batch in ds.select_columns([text_column]).iter(batch_size=1000):
        for offset, value in enumerate(batch[text_column]):
            if value is not None and not isinstance(value, str):
                return start + offset, value
        start += len(batch[text_column])
    return None


def tokenize_dataset(
    ds, *, text_column: str | None = None, num_proc: int | None = None, cache_dir: str | Path | None = None
) -> np.ndarray:
    """The whole dataset as one uint16 token stream, <|endoftext|> after each document; cached."""
    import datasets

    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"ds must be a datasets.Dataset (load_text_dataset gives one), got {type(ds).__name__}")
    text_column = text_column or ds.column_names[0]
    _check_text_column(ds, text_column)
    cache_dir = user_path(cache_dir, "cache_dir") if cache_dir is not None else default_cache_dir()
    check_directory_path(cache_dir, "cache_dir")
    cache_file = cache_dir / f"tokens-{_cache_key(ds, text_column)}.npy"
    if cache_file.is_file():
        tokens = np.load(cache_file, mmap_mode="r")
        logger.info("loaded %s tokens from the cache %s; tokenization skipped", f"{len(tokens):,}", cache_file)
        return tokens

    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(ds) >= 1000 else None
    mapped = ds.map(
        _encode_batch,
        fn_kwargs={"text_column": text_column},
        batched=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        desc="tokenizing",
    )
    lengths = mapped["n"]
    total = sum(lengths)
    if nulls := lengths.count(0):  # an empty string still gives its <|endoftext|>
        logger.warning("skipped %s of %s documents whose %r is null", f"{nulls:,}", f"{len(ds):,}", text_column)
    tokens = np.empty(total, dtype=np.uint16)
    offset = 0
    for batch in mapped.iter(batch_size=1000):
        for ids in batch["ids"]:
            tokens[offset : offset + len(ids)] = ids
            offset += len(ids)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(cache_file, lambda tmp: _save_npy(tmp, tokens))  # a run cut off leaves no half cache behind
    logger.info("tokenized %s documents into %s tokens; cached at %s", f"{len(ds):,}", f"{total:,}", cache_file)
    return tokens


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file, as np.save would add ".npy" to a temporary name
        np.save(f, array)


def train_val_split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_fraction) of the stream for training, the rest for validation."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


def _check_token_stream(tokens: object, name: str) -> None:
    """A 1-D numpy array of integer ids, as tokenize_dataset gives: a list or a tensor failed at the
    first window ("no attribute 'astype'"), a 2-D array was cut into windows of rows, and float
    values were truncated to ids, without a word."""
    if not isinstance(tokens, np.ndarray):
        hint = "; convert with tokens.numpy()" if isinstance(tokens, torch.Tensor) else ""
        raise TypeError(
            f"the {name} split must be a numpy array of token ids (as tokenize_dataset gives), "
            f"got {type(tokens).__name__}{hint}"
        )
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"the {name} split must be one stream of token ids, a 1-D integer array, got shape {tokens.shape} "
            f"and dtype {tokens.dtype}"
        )


class TokenWindows(Dataset):
    """Windows of n_ctx + 1 tokens starting every `stride` tokens: (input, target) = (w[:-1], w[1:]).

    stride == n_ctx tiles the stream; a smaller stride gives overlapping windows.
    """

    def __init__(self, tokens: np.ndarray, n_ctx: int, stride: int | None = None, name: str = "dataset"):
        for arg, value in (("n_ctx", n_ctx), ("stride", stride)):
            if value is not None:
                check_count(arg, value, 1)  # a float stride: float starts
        _check_token_stream(tokens, name)
        stride = n_ctx if stride is None else stride
        if len(tokens) < n_ctx + 1:
            more = "more data, a larger val_fraction (--val-fraction)" if name == "val" else "more data"
            raise ValueError(
                f"the {name} split has {len(tokens):,} tokens, shorter than one window of n_ctx + 1 = {n_ctx + 1}; "
                f"use {more} or a smaller n_ctx"
            )
        self.tokens, self.n_ctx, self.stride = tokens, n_ctx, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.n_ctx - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # IndexError past the end is what stops a for loop over the windows (a Dataset has no __iter__)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} is outside the {n} windows [{-n}, {n})")
        start = (i % n) * self.stride
        window = torch.from_numpy(self.tokens[start : start + self.n_ctx + 1].astype(np.int64))
        return window[:-1], window[1:]


class ResumableSampler(Sampler[int]):
    """Shuffled indices, a fresh permutation per epoch from (seed, epoch), sharded across ranks.

    `start` skips the samples this rank already consumed in the epoch, which is all a resumed
    run needs to see exactly the batches the interrupted run would have seen.
    """

    def __init__(self, n: int, *, seed: int, epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        # Each had failed far from here, or not at all: world_size 0 divided by zero, a rank past
        # the world took samples of another's shard, and a negative start counted samples it never gave.
        for name, value, minimum in (("n", n, 0), ("epoch", epoch, 0), ("world_size", world_size, 1)):
            check_count(name, value, minimum)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self.n, self.seed, self.epoch = n, seed, epoch
        self.rank, self.world_size = rank, world_size
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= self.per_rank():
            raise ValueError(
                f"start must be an int in [0, {self.per_rank()}] (the samples this rank takes in an epoch), got {start!r}"
            )
        self.start = start

    def per_rank(self) -> int:
        return self.n // self.world_size

    def __iter__(self):
        # Modulo 2**64 as torch takes a negative seed, so the largest seeds wrap rather than overflow.
        gen = torch.Generator().manual_seed((self.seed + self.epoch) % 2**64)
        order = torch.randperm(self.n, generator=gen)[: self.per_rank() * self.world_size]
        mine = order[self.rank :: self.world_size]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank() - self.start


@dataclass
class TokenData:
    """The train and validation streams of one dataset, ready to cut into windows."""

    train: np.ndarray
    val: np.ndarray
    source: str

    @classmethod
    def load(
        cls,
        source: str = EMBEDDED_DATASET,
        *,
        text_column: str = "text",
        split: str = "train",
        config_name: str | None = None,
        max_examples: int | None = None,
        val_fraction: float = 0.1,
        num_proc: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> "TokenData":
        ds = load_text_dataset(
            source, text_column=text_column, split=split, config_name=config_name, max_examples=max_examples
        )
        tokens = tokenize_dataset(ds, num_proc=num_proc, cache_dir=cache_dir)
        train, val = train_val_split(tokens, val_fraction)
        return cls(train, val, source)

    def loader(
        self,
        which: str,
        *,
        n_ctx: int,
        batch_size: int,
        stride: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> DataLoader:
        """A DataLoader of (input, target) [batch_size, n_ctx] batches over one split."""
        if which not in ("train", "val"):
            raise ValueError(f"which must be 'train' or 'val', got {which!r}")
        check_flag("pin_memory", pin_memory)  # "no" would be truthy
        check_count("batch_size", batch_size, 1)  # before the comparison below, which 0 or 2.5 would pass
        tokens = {"train": self.train, "val": self.val}[which]
        windows = TokenWindows(tokens, n_ctx, stride, name=which)
        sampler = ResumableSampler(len(windows), seed=seed, epoch=epoch, start=start, rank=rank, world_size=world_size)
        if sampler.per_rank() < batch_size:
            more = " or a larger val_fraction (--val-fraction)" if which == "val" else ""
            raise ValueError(
                f"the {which} split gives {sampler.per_rank()} windows per process, fewer than batch_size={batch_size}; "
                f"use a smaller batch_size (--batch-size), more data{more}"
            )
        # Its own generator, so iterating never draws from (and shifts) the global torch RNG.
        return DataLoader(
            windows,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            pin_memory=pin_memory,
            generator=torch.Generator(),
        )


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int = 50257) -> float:
    """Cross-entropy (nats/token) on `val` of a unigram model fit on `train` (add-one smoothing).

    The baseline a language model must beat: it knows token frequencies and nothing else.
    """
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[np.asarray(val, dtype=np.int64)].mean())
