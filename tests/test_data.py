"""Datasets to token windows: sources, document separators, the cache, splits, errors."""

import gzip
import itertools
import json
import logging
import re
from pathlib import Path

import datasets
import httpx
import numpy as np
import pytest
import torch

import gpt2_small.data
from gpt2_small import EOT_ID, get_tokenizer
from gpt2_small.data import (
    ResumableSampler,
    TokenData,
    TokenWindows,
    load_text_dataset,
    tokenize_dataset,
    train_val_split,
    unigram_loss,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_embedded_shakespeare_is_42_works(tmp_path):
    ds = load_text_dataset()
    assert len(ds) == 42
    assert ds[0]["text"].startswith("ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare")
    assert all(doc.count("by William Shakespeare") == 1 for doc in ds["text"])
    tokens = tokenize_dataset(ds, cache_dir=tmp_path)
    assert tokens.dtype == np.uint16
    assert int((tokens == EOT_ID).sum()) == 42 and tokens[-1] == EOT_ID
    assert 1_500_000 < len(tokens) < 1_650_000  # about 1.57M GPT-2 tokens


def test_the_suite_writes_its_caches_under_its_temp_dir_not_home(private_caches, tmp_path):
    # conftest's private_caches; without it every run leaves Arrow caches in ~/.cache/huggingface.
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Hello world"}])
    arrow_files = [f["filename"] for f in load_text_dataset(str(path)).cache_files]
    assert arrow_files and all(Path(f).is_relative_to(private_caches) for f in arrow_files), arrow_files
    assert gpt2_small.data.default_cache_dir().is_relative_to(private_caches)


def test_the_default_token_cache_is_under_gpt2_small_cache_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_SMALL_CACHE", str(tmp_path / "mine"))
    assert gpt2_small.data.default_cache_dir() == tmp_path / "mine" / "tokens"
    monkeypatch.delenv("GPT2_SMALL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gpt2_small.data.default_cache_dir() == tmp_path / "home" / ".cache" / "gpt2_small" / "tokens"
    monkeypatch.setenv("GPT2_SMALL_CACHE", "~/mine")  # as a quoted export leaves it
    assert gpt2_small.data.default_cache_dir() == tmp_path / "home" / "mine" / "tokens"
    monkeypatch.setenv("GPT2_SMALL_CACHE", "")  # set but empty is unset; before: "tokens" in the working directory
    assert gpt2_small.data.default_cache_dir() == tmp_path / "home" / ".cache" / "gpt2_small" / "tokens"


def test_documents_are_separated_by_endoftext(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Hello world"}, {"text": " the end"}])
    tokens = tokenize_dataset(load_text_dataset(str(path)), cache_dir=tmp_path / "cache")
    enc = get_tokenizer()
    assert tokens.tolist() == enc.encode("Hello world") + [EOT_ID] + enc.encode(" the end") + [EOT_ID]


def test_null_documents_are_skipped_with_a_warning(tmp_path, caplog):
    rows = [{"text": "Hello world"}, {"text": None}, {"text": ""}, {"text": " the end"}]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="gpt2_small.data"):
        tokens = tokenize_dataset(load_text_dataset(str(path)), cache_dir=tmp_path / "cache")
    enc = get_tokenizer()
    # the empty document keeps its <|endoftext|>; the missing one leaves no trace (before: tiktoken's TypeError)
    assert tokens.tolist() == enc.encode("Hello world") + [EOT_ID, EOT_ID] + enc.encode(" the end") + [EOT_ID]
    assert "skipped 1 of 4 documents whose 'text' is null" in caplog.text


def test_an_empty_source_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch):
    """Before: Path("") is ".", so load_text_dataset("") loaded the working directory's files."""
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "a document"}])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^source is empty; name 'shakespeare', a hub dataset or a local path$"):
        load_text_dataset("")
    assert load_text_dataset(".")["text"] == ["a document"]  # "." says it


@pytest.mark.parametrize(
    "value, held",
    [(5, "int64 values"), (["a", "b"], r".*string.*"), (None, "null values")],
    ids=["int", "list", "all-null"],
)
def test_a_text_column_that_holds_no_strings_is_refused(tmp_path, value, held):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": value, "body": "x"}] * 2)
    with pytest.raises(ValueError, match=rf"the text column 'text' holds {held}, not strings; .*\['text', 'body'\]"):
        load_text_dataset(str(path))
    own = datasets.Dataset.from_dict({"text": [value] * 2})  # a user's own dataset, straight to the tokenizer
    with pytest.raises(ValueError, match=rf"the text column 'text' holds {held}, not strings; .*\['text'\]"):
        tokenize_dataset(own, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "values, shown",
    [
        (["hi", None, "x", [1, 2], 3], "row 3 holds [1, 2] (list)"),
        (["hi", {"a": "x"}], "row 1 holds {'a': 'x'} (dict)"),
    ],
    ids=["list-and-int", "dict"],
)
def test_a_text_column_of_mixed_json_types_names_the_first_row_that_is_no_string(tmp_path, values, shown):
    """datasets 5 reads a JSON column whose rows differ in type as a Json feature. Before: "holds
    Json(decode=True), not strings", naming neither the row nor its value."""
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": value} for value in values])
    message = f"the text column 'text' holds values of several JSON types, and {shown}, not a string; make every "
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        load_text_dataset(str(path))


def test_second_run_reads_the_token_cache(tmp_path, caplog):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i}"} for i in range(50)])
    with caplog.at_level(logging.INFO, logger="gpt2_small.data"):
        first = tokenize_dataset(load_text_dataset(str(path)), cache_dir=tmp_path / "cache")
        assert "tokenized 50 documents" in caplog.text and "tokenization skipped" not in caplog.text
        caplog.clear()
        second = tokenize_dataset(load_text_dataset(str(path)), cache_dir=tmp_path / "cache")
        assert "tokenization skipped" in caplog.text
    assert np.array_equal(first, second)
    assert isinstance(second, np.memmap)  # a cache of billions of tokens is paged in, not read whole
    assert len(list((tmp_path / "cache").glob("tokens-*.npy"))) == 1
    # Different content is a different cache entry, never a stale hit.
    write_jsonl(path, [{"text": f"other document {i}"} for i in range(50)])
    third = tokenize_dataset(load_text_dataset(str(path)), cache_dir=tmp_path / "cache")
    assert not np.array_equal(first, third)


def test_a_crash_while_writing_the_cache_leaves_no_cache_entry(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i}"} for i in range(5)])
    real_save = np.save

    def save_half_then_crash(file, tokens):
        real_save(file, tokens[: len(tokens) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save_half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tokenize_dataset(load_text_dataset(str(path)), cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written cache for a later run to read
    tokens = tokenize_dataset(load_text_dataset(str(path)), cache_dir=tmp_path / "cache")
    assert tokens[-1] == EOT_ID and list(tokens).count(EOT_ID) == 5  # all five documents


def test_each_text_column_of_one_dataset_has_its_own_cache_entry(tmp_path):
    ds = datasets.Dataset.from_dict({"title": ["A play", "A poem"], "body": ["To be, or not", "Shall I compare"]})
    titles = tokenize_dataset(ds, text_column="title", cache_dir=tmp_path)
    bodies = tokenize_dataset(ds, text_column="body", cache_dir=tmp_path)  # not the titles' cached tokens
    encode = get_tokenizer().encode_ordinary
    assert titles.tolist() == encode("A play") + [EOT_ID] + encode("A poem") + [EOT_ID]
    assert bodies.tolist() == encode("To be, or not") + [EOT_ID] + encode("Shall I compare") + [EOT_ID]
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2
    assert np.array_equal(tokenize_dataset(ds, cache_dir=tmp_path), titles)  # unnamed: the first column


def test_another_tokenizer_file_is_another_cache_entry(tmp_path, monkeypatch, caplog):
    """Tokens cached under one BPE file are never read back for another (an updated bundled asset)."""
    ds = datasets.Dataset.from_dict({"text": ["a document", "another"]})
    first = tokenize_dataset(ds, cache_dir=tmp_path)
    monkeypatch.setattr(gpt2_small.data, "sha256_of", lambda path: "0" * 64)
    with caplog.at_level(logging.INFO, logger="gpt2_small.data"):
        second = tokenize_dataset(ds, cache_dir=tmp_path)
    assert "tokenization skipped" not in caplog.text and "tokenized 2 documents" in caplog.text
    assert np.array_equal(first, second) and len(list(tmp_path.glob("tokens-*.npy"))) == 2


def test_a_cache_dir_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ds = datasets.Dataset.from_dict({"text": ["a document"]})
    tokenize_dataset(ds, cache_dir="~/token-cache")
    assert len(list((tmp_path / "token-cache").glob("tokens-*.npy"))) == 1
    assert not Path("~").exists()  # no folder literally named "~" in the working directory


def test_a_cache_dir_that_is_a_file_is_refused_before_tokenizing(tmp_path, monkeypatch):
    """Before: "[Errno 17] File exists" after the whole dataset had been tokenized."""
    ds = datasets.Dataset.from_dict({"text": ["a document", "another"]})
    monkeypatch.setattr(type(ds), "map", lambda *a, **k: pytest.fail("tokenized before cache_dir was checked"))
    file = tmp_path / "notes.txt"
    file.write_text("a file")
    with pytest.raises(ValueError, match=rf"cache_dir '{re.escape(str(file))}' is a file; choose a directory"):
        tokenize_dataset(ds, cache_dir=file)
    with pytest.raises(ValueError, match=rf"cache_dir '.*tokens' lies under {re.escape(str(file))}, which is a file"):
        tokenize_dataset(ds, cache_dir=file / "tokens")


@pytest.mark.parametrize(
    "options, named",
    [
        ({"text_column": "body"}, r"text_column='body' \(--text-column\) cannot apply; leave it out$"),
        ({"split": "validation", "config_name": "x"}, r"split='validation' \(--split\) and config_name='x'"),
    ],
)
def test_options_the_bundled_corpus_cannot_honour_are_refused(options, named):
    """Before: the same 42 works were read whatever these said."""
    with pytest.raises(ValueError, match=rf"^the bundled 'shakespeare' has one split, 'train', .*: {named}"):
        load_text_dataset("shakespeare", **options)


def test_options_a_local_path_cannot_honour_are_refused(tmp_path):
    """Before: the whole file was read as `split`, whatever that said, and config_name was dropped."""
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a document"}])
    for options, named in [({"split": "test"}, "split='test'"), ({"config_name": "en"}, "config_name='en'")]:
        with pytest.raises(
            ValueError, match=rf"read whole, as one split, .*: {named} .*point the dataset at the files"
        ):
            load_text_dataset(str(path), **options)
    assert load_text_dataset(str(path), split="train", config_name=None)["text"] == ["a document"]


@pytest.mark.parametrize("kind", ["txt", "txt.gz", "jsonl", "jsonl.gz", "csv", "csv.gz", "parquet"])
def test_local_files(tmp_path, kind):
    """Before, a .jsonl.gz was read as one text document of raw JSON lines."""
    docs = ["First document.\nWith two lines.", "Second document."]
    if kind == "txt":
        for i, doc in enumerate(docs):
            (tmp_path / f"{i}.txt").write_text(doc)
        # Not documents: a Finder file and a notebook's copy of one (which would duplicate it)
        (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (tmp_path / ".ipynb_checkpoints").mkdir()
        (tmp_path / ".ipynb_checkpoints" / "0-checkpoint.txt").write_text(docs[0])
        source = tmp_path
    elif kind == "txt.gz":
        for i, doc in enumerate(docs):
            with gzip.open(tmp_path / f"{i}.txt.gz", "wt") as f:
                f.write(doc)
        source = tmp_path
    elif kind == "jsonl":
        source = write_jsonl(tmp_path / "d.jsonl", [{"body": d} for d in docs])
    elif kind == "jsonl.gz":
        source = tmp_path / "d.jsonl.gz"
        with gzip.open(source, "wt") as f:
            f.write("".join(json.dumps({"body": d}) + "\n" for d in docs))
    elif kind.startswith("csv"):  # a quoted field keeps its newline and comma in one document
        docs[1] = 'Second, "quoted" document.'
        table = 'id,body\n1,"First document.\nWith two lines."\n2,"Second, ""quoted"" document."\n'
        source = tmp_path / f"d.{kind}"
        with gzip.open(source, "wt") if kind.endswith(".gz") else open(source, "w") as f:
            f.write(table)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = tmp_path / "d.parquet"
        pq.write_table(pa.table({"body": docs}), source)
    column = "text" if kind.startswith("txt") else "body"
    ds = load_text_dataset(str(source), text_column=column)
    assert sorted(ds[column]) == sorted(docs)  # one document per file / row


def test_a_gz_file_named_with_dots_is_one_text_document(tmp_path):
    with gzip.open(tmp_path / "hamlet.1603.gz", "wt") as f:
        f.write("Who's there?")
    assert load_text_dataset(str(tmp_path / "hamlet.1603.gz"))["text"] == ["Who's there?"]


def test_other_columns_are_dropped_and_a_large_string_column_is_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": pa.array(["one", "two"], pa.large_string())}), path)
    ds = load_text_dataset(str(path), text_column="body")
    assert ds.column_names == ["body"] and ds["body"] == ["one", "two"]


def test_max_examples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(10)])
    assert load_text_dataset(str(path), max_examples=3)["text"] == ["0", "1", "2"]
    assert len(load_text_dataset(str(path), max_examples=11)) == 10  # more than there are: all of them


def test_loading_and_tokenizing_name_arguments_of_the_wrong_type(tmp_path, without_shape_checks):
    """Before: max_examples=2.5 was taken (and failed in range() once the dataset had more rows),
    "3" failed with "'<' not supported", source=None with os.fspath's message naming no argument,
    and tokenize_dataset of a list with "'list' object has no attribute 'column_names'"."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(10)])
    for value in (2.5, "3", True):
        with pytest.raises(TypeError, match=rf"^max_examples must be an int or None, got {re.escape(repr(value))}$"):
            load_text_dataset(str(path), max_examples=value)
    with pytest.raises(TypeError, match=r"^source must be a dataset's name or a path, got NoneType$"):
        load_text_dataset(None)
    with pytest.raises(TypeError, match=r"^ds must be a datasets.Dataset \(load_text_dataset gives one\), got list$"):
        tokenize_dataset(["some text"], cache_dir=tmp_path / "cache")
    assert load_text_dataset(path, max_examples=2)["text"] == ["0", "1"]  # a Path, as its str


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """'someone/corpus' on a pretend hub: load_dataset serves it from a local JSONL file (streamed
    when asked) and records how it was asked."""
    import datasets

    path = write_jsonl(tmp_path / "corpus.jsonl", [{"id": i, "text": f"hub document {i}"} for i in range(40)])
    real, calls = datasets.load_dataset, []

    def load_dataset(source, config_name=None, *, split, streaming=False, **kwargs):
        if source != "someone/corpus":
            return real(source, config_name, split=split, streaming=streaming, **kwargs)
        calls.append({"split": split, "streaming": streaming})
        ds = real("json", data_files={split: str(path)}, split=split, streaming=streaming)
        if not streaming:
            return ds
        calls[-1]["rows_read"] = read = []  # filled as the stream is consumed

        def count(row):
            read.append(row["id"])
            return row

        return ds.map(count)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_max_examples_of_a_hub_dataset_are_streamed_not_downloaded_whole(tmp_path, fake_hub, caplog):
    whole = load_text_dataset("someone/corpus")
    assert fake_hub == [{"split": "train", "streaming": False}] and len(whole) == 40
    first = load_text_dataset("someone/corpus", max_examples=5)
    asked = fake_hub[-1]
    assert (asked["split"], asked["streaming"]) == ("train", True)
    assert asked["rows_read"] in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5])  # datasets' take() may read one ahead; not 40
    assert first["text"] == whole["text"][:5] == [f"hub document {i}" for i in range(5)]
    assert first.column_names == ["text"]
    with caplog.at_level(logging.INFO, logger="gpt2_small.data"):
        tokens = tokenize_dataset(first, cache_dir=tmp_path / "cache")
        again = tokenize_dataset(load_text_dataset("someone/corpus", max_examples=5), cache_dir=tmp_path / "cache")
    assert "tokenization skipped" in caplog.text and np.array_equal(tokens, again)  # streamed again, cached
    more = tokenize_dataset(load_text_dataset("someone/corpus", max_examples=6), cache_dir=tmp_path / "cache")
    assert len(more) > len(tokens)  # other documents, another cache entry
    with pytest.raises(ValueError, match=r"no text column 'body'; its columns are \['id', 'text'\]"):
        load_text_dataset("someone/corpus", text_column="body", max_examples=2)
    with pytest.raises(ValueError, match="max_examples must be >= 1, got 0"):
        load_text_dataset("someone/corpus", max_examples=0)
    assert len(fake_hub) == 5  # refused before anything was asked of the hub


def test_a_streamed_column_of_no_strings_is_refused_naming_the_streams_columns(fake_hub):
    """Before: the streamed rows became a Dataset of the text column alone, so the refusal listed
    that column only ("the columns are ['id']"), hiding the one the user meant."""
    message = (
        "the text column 'id' holds 0 (int) in row 0, not a string; name the column of documents with "
        "text_column (--text-column); the columns are ['id', 'text']"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        load_text_dataset("someone/corpus", text_column="id", max_examples=3)
    assert load_text_dataset("someone/corpus", max_examples=3)["text"] == [f"hub document {i}" for i in range(3)]


@pytest.mark.parametrize("error", [httpx.ReadTimeout("timed out"), ConnectionError("Connection reset by peer")])
def test_a_stream_cut_off_midway_is_one_clear_error(monkeypatch, error):
    """Online, the connection can drop after the first documents of a streamed split. Before: the
    error came out of datasets' iterator as a traceback."""

    class Stream:
        def take(self, n):
            yield {"text": "one"}
            yield {"text": "two"}
            raise error

    monkeypatch.setattr(gpt2_small.data, "_load_hub", lambda *args, **kwargs: Stream())
    with pytest.raises(ValueError) as raised:
        load_text_dataset("someone/corpus", max_examples=10)
    assert str(raised.value) == (
        f"streaming 'someone/corpus' stopped after 2 of 10 documents ({type(error).__name__}: {error}); nothing "
        "was kept: run again once the Hugging Face Hub can be reached"
    )


def test_missing_text_column_names_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(ValueError, match=r"no text column 'text'; its columns are \['body', 'id'\]"):
        load_text_dataset(str(path))


def test_empty_dataset_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    ds = load_text_dataset(str(path))
    with pytest.raises(ValueError, match="max_examples must be >= 1"):
        load_text_dataset(str(path), max_examples=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found \\['no files'\\]"):
        load_text_dataset(str(tmp_path / "empty"))
    assert len(ds) == 1
    (tmp_path / "empty.jsonl").write_text("")  # datasets raised a bare StopIteration
    with pytest.raises(ValueError, match=r"empty.jsonl: holds no JSON rows; it is empty"):
        load_text_dataset(str(tmp_path / "empty.jsonl"))


@pytest.mark.parametrize("streamed", [False, True])
def test_an_empty_hub_split_is_refused_as_empty(monkeypatch, streamed):
    """Streamed, its column has no type; it was refused as holding null values, not strings."""

    def no_rows():
        yield from ()

    features = datasets.Features(text=datasets.Value("string"))
    empty = (
        datasets.IterableDataset.from_generator(no_rows, features=features)
        if streamed
        else datasets.Dataset.from_dict({"text": []}, features=features)
    )
    monkeypatch.setattr(gpt2_small.data, "_load_hub", lambda *args, **kwargs: empty)
    with pytest.raises(ValueError, match=r"^dataset 'someone/empty' \(split 'train'\) is empty$"):
        load_text_dataset("someone/empty", max_examples=3 if streamed else None)


@pytest.mark.parametrize(
    "name, content, match",
    [
        (
            "latin1.txt",
            "café crème\n".encode("latin-1"),
            r"as text \(UnicodeDecodeError: .*\); text files must be UTF-8",
        ),
        ("cut.jsonl", b'{"text": "a"}\n{"text": \n', r"as json \(ArrowInvalid: JSON parse error"),
        ("fake.parquet", b"not parquet", r"as parquet \(ArrowInvalid: Parquet magic bytes not found"),
        ("empty.csv", b"", r"as csv \(EmptyDataError: No columns to parse from file\)"),
        ("ragged.csv", b'text\n"a\nb,c\n', r"as csv \(ParserError: "),
    ],
)
def test_unreadable_local_files_are_named(tmp_path, name, content, match):
    """Before: datasets' DatasetGenerationError ("An error occurred while generating the dataset") and
    a traceback from train_demo, or pyarrow's message without the file's name."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / name))}: could not read it {match}"):
        load_text_dataset(str(tmp_path / name))


def test_mixed_file_kinds_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.xml").write_text("y")
    with pytest.raises(ValueError, match=r"of one kind, found \['.txt', '.xml'\]"):
        load_text_dataset(str(tmp_path))
    (tmp_path / "b.xml").rename(tmp_path / "b.jsonl")  # two kinds this reads, but not together
    with pytest.raises(ValueError, match=r"of one kind, found \['.jsonl', '.txt'\]"):
        load_text_dataset(str(tmp_path))
    with pytest.raises(ValueError, match=r"of one kind, found \['.xml'\]"):  # one kind, not one this reads
        load_text_dataset(str(write_jsonl(tmp_path / "c.xml", [])))


def test_unknown_dataset_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        ValueError, match=r"^could not load dataset 'nobody/no-such-dataset-xyz' \(offline mode is on\)"
    ):
        load_text_dataset("nobody/no-such-dataset-xyz")


@pytest.mark.parametrize(
    "error",
    [
        datasets.exceptions.DatasetNotFoundError("no such dataset"),
        datasets.exceptions.DatasetNotFoundError(
            "Dataset 'nobody/typo' is a gated dataset on the Hub.\nYou must be authenticated to access it."
        ),
        FileNotFoundError("no data files"),
        OSError("reset"),
        httpx.ConnectError("connection reset"),  # httpx's transport errors are no OSError
    ],
    ids=["not-found", "gated", "no-files", "os-error", "httpx"],
)
def test_what_the_hub_raises_online_for_an_unknown_dataset_is_the_same_clear_error(monkeypatch, error):
    """Online, the hub answers a wrong id with DatasetNotFoundError (or a missing file, or a dropped
    connection), not the offline ConnectionError; load_dataset stands in for it here. Its words are
    kept, on one line: before, only the error's type was, and a gated dataset was called unknown."""

    def load_dataset(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError) as raised:
        load_text_dataset("nobody/typo")
    reason = " ".join(str(error).split())
    assert str(raised.value).startswith(
        "could not load dataset 'nobody/typo': it is not a local file or directory, and the Hugging Face Hub could "
        f"not provide it ({type(error).__name__}: {reason}). Offline, use the bundled 'shakespeare'"
    )


@pytest.mark.parametrize(
    "source", ["missing.txt", "corpus/missing.jsonl", "b.parquet", "./notes", "~/no-such-dir-xyz", "notes/", "a/b/c"]
)
@pytest.mark.parametrize("max_examples", [None, 3])
def test_a_missing_local_path_is_named_without_asking_the_hub(source, max_examples, monkeypatch, tmp_path):
    """A mistyped file name went to the hub: about 20 s of retries offline, then "unknown dataset"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))

    def load_dataset(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args[0]!r}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    where = re.escape(str((tmp_path / source.removeprefix("~/")).absolute()).replace("/./", "/"))
    with pytest.raises(
        FileNotFoundError, match=rf"^no such file or directory: '{re.escape(source)}', looked for at {where} "
    ):
        load_text_dataset(source, max_examples=max_examples)
    with pytest.raises(AssertionError, match="the hub was asked for 'owner/name'"):  # a hub id still goes there
        load_text_dataset("owner/name", max_examples=max_examples)


def test_dataset_shorter_than_one_window():
    with pytest.raises(ValueError, match=r"the val split has 100 tokens, shorter than one window of n_ctx \+ 1 = 129"):
        TokenWindows(np.zeros(100, dtype=np.uint16), n_ctx=128, name="val")
    with pytest.raises(ValueError, match=r"the train split has 128 tokens, .*; use more data or a smaller n_ctx$"):
        TokenWindows(np.zeros(128, dtype=np.uint16), n_ctx=128, name="train")
    assert len(TokenWindows(np.zeros(129, dtype=np.uint16), n_ctx=128)) == 1


def test_windows_tile_or_overlap_by_stride():
    tokens = np.arange(20, dtype=np.uint16)
    tiled = TokenWindows(tokens, n_ctx=4)
    assert len(tiled) == 4  # starts 0, 4, 8, 12 (each needs 5 tokens)
    x, y = tiled[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8] and x.dtype == torch.long
    overlapping = TokenWindows(tokens, n_ctx=4, stride=2)
    assert len(overlapping) == 8 and overlapping[1][0].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"^stride must be an int >= 1, got 0$"):
        TokenWindows(tokens, n_ctx=4, stride=0)


def test_windows_name_an_n_ctx_or_stride_that_is_no_positive_int(without_shape_checks):
    """Before: n_ctx=0 was named as a bad stride (its default), and a float stride was taken, to
    fail at the first window's float slice."""
    tokens = np.arange(20, dtype=np.uint16)
    with pytest.raises(ValueError, match=r"^n_ctx must be an int >= 1, got 0$"):
        TokenWindows(tokens, n_ctx=0)
    with pytest.raises(ValueError, match=r"^stride must be an int >= 1, got 1.5$"):
        TokenWindows(tokens, n_ctx=4, stride=1.5)


def test_windows_refuse_a_stream_that_is_no_1d_integer_array(without_shape_checks):
    """Before: a list or a tensor failed at the first window ("'list' object has no attribute
    'astype'"), a [10, 100] array gave windows of whole rows, and float values were cut to ids."""
    for tokens, shown in [(list(range(100)), "list"), (torch.arange(100), "Tensor; convert with tokens.numpy()")]:
        with pytest.raises(
            TypeError, match=rf"^the train split must be a numpy array of token ids .*, got {re.escape(shown)}$"
        ):
            TokenWindows(tokens, n_ctx=8, name="train")
    for tokens in (np.zeros((10, 100), dtype=np.uint16), np.zeros(100)):
        shape = re.escape(f"got shape {tokens.shape} and dtype {tokens.dtype}")
        with pytest.raises(ValueError, match=rf"^the train split must be one stream of token ids, .*{shape}$"):
            TokenWindows(tokens, n_ctx=8, name="train")
    with pytest.raises(TypeError, match=r"^the val split must be a numpy array of token ids"):
        TokenData(np.arange(100, dtype=np.uint16), list(range(100)), "mine").loader("val", n_ctx=8, batch_size=1)
    for dtype in (np.uint16, np.int32, np.int64):  # what tokenize_dataset gives, and a user's own
        assert TokenWindows(np.arange(100, dtype=dtype), n_ctx=8)[1][0].tolist() == list(range(8, 16))


def test_windows_index_as_a_sequence_and_iteration_stops_at_the_last():
    """Before, an index past the end gave a short window (or an empty one), and a for loop over the
    windows, which stops only at an IndexError, never ended."""
    windows = TokenWindows(np.arange(20, dtype=np.uint16), n_ctx=4, stride=3)  # starts 0, 3, ..., 15
    inputs = [x.tolist() for x, _ in itertools.islice(windows, 10)]  # bounded: before, it never stopped
    assert inputs == [[start + i for i in range(4)] for start in range(0, 16, 3)]
    assert windows[-1][1].tolist() == [16, 17, 18, 19] and windows[-6][0].tolist() == [0, 1, 2, 3]
    for outside in (6, -7):
        with pytest.raises(IndexError, match=rf"window {outside} is outside the 6 windows \[-6, 6\)"):
            windows[outside]


def test_train_val_split_is_a_deterministic_tail():
    tokens = np.arange(1000)
    train, val = train_val_split(tokens, 0.1)
    assert np.array_equal(train, np.arange(900)) and np.array_equal(val, np.arange(900, 1000))
    for outside in (1.0, 0.0):
        with pytest.raises(ValueError, match=rf"val_fraction must be in \(0, 1\), got {outside}"):
            train_val_split(tokens, outside)


def test_train_val_split_names_a_fraction_that_is_no_number(without_shape_checks):
    with pytest.raises(ValueError, match=r"^val_fraction must be in \(0, 1\), got '0.1'$"):  # was "'<' not supported"
        train_val_split(np.arange(1000), "0.1")


def test_a_loader_of_another_split_than_train_or_val_is_named():
    data = TokenData(np.arange(100, dtype=np.uint16), np.arange(50, dtype=np.uint16), "numbers")
    with pytest.raises(ValueError, match=r"^which must be 'train' or 'val', got 'test'$"):  # was KeyError: 'test'
        data.loader("test", n_ctx=4, batch_size=1)
    assert next(iter(data.loader("val", n_ctx=4, batch_size=1)))[0].shape == (1, 4)


def test_a_loader_pin_memory_that_is_no_bool_is_named(without_shape_checks):
    """Before: pin_memory="no" was truthy, and pinned (or, with no accelerator, warned)."""
    data = TokenData(np.arange(100, dtype=np.uint16), np.arange(50, dtype=np.uint16), "numbers")
    with pytest.raises(TypeError, match=r"^pin_memory must be True or False, got 'no'$"):
        data.loader("val", n_ctx=4, batch_size=1, pin_memory="no")
    assert data.loader("val", n_ctx=4, batch_size=1, pin_memory=False).pin_memory is False


def test_token_data_load_passes_its_options_through(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": f"document number {i}", "text": 0} for i in range(40)])
    data = TokenData.load(str(path), text_column="body", max_examples=30, val_fraction=0.25, cache_dir=tmp_path / "c")
    tokens = tokenize_dataset(load_text_dataset(str(path), text_column="body", max_examples=30), cache_dir=tmp_path)
    assert len(tokens) == 30 * 4  # "document", " number", " 0" to " 29", <|endoftext|>
    cut = int(len(tokens) * 0.75)
    assert np.array_equal(data.train, tokens[:cut]) and np.array_equal(data.val, tokens[cut:])
    assert data.source == str(path)
    assert len(list((tmp_path / "c").glob("tokens-*.npy"))) == 1  # its cache_dir, not the default


def test_sampler_shards_are_disjoint_and_resume_mid_epoch():
    full = list(ResumableSampler(10, seed=3, epoch=1))
    assert sorted(full) == list(range(10))
    assert full != list(ResumableSampler(10, seed=3, epoch=2))  # a new order each epoch
    assert list(ResumableSampler(10, seed=3, epoch=1, start=4)) == full[4:]
    assert len(ResumableSampler(10, seed=3, epoch=1, start=4)) == 6  # what a progress bar counts
    shards = [list(ResumableSampler(10, seed=3, epoch=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 3 for s in shards)  # 10 // 3 each; the remainder is dropped evenly
    assert len(set().union(*shards)) == 9


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        # Before: ZeroDivisionError.
        ({"world_size": 0}, ValueError, "world_size must be an int >= 1, got 0"),
        # Before: rank 2 of 2 took order[2::2], rank 0's shard less one; -1 took one sample.
        ({"rank": 2, "world_size": 2}, ValueError, "rank must be an int in [0, world_size=2), got 2"),
        ({"rank": -1, "world_size": 2}, ValueError, "rank must be an int in [0, world_size=2), got -1"),
        # Before: the last 3 samples, with a length of 13; past the end, "__len__() should return >= 0".
        (
            {"start": -3},
            ValueError,
            "start must be an int in [0, 10] (the samples this rank takes in an epoch), got -3",
        ),
        (
            {"start": 11},
            ValueError,
            "start must be an int in [0, 10] (the samples this rank takes in an epoch), got 11",
        ),
        ({"epoch": -1}, ValueError, "epoch must be an int >= 0, got -1"),
        ({"seed": "3"}, TypeError, "seed must be an int, got '3'"),  # before: "can only concatenate str"
    ],
)
def test_sampler_refuses_what_names_no_shard_or_place_in_it(kwargs, error, message, without_shape_checks):
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        ResumableSampler(10, **({"seed": 3} | kwargs))
    assert list(ResumableSampler(10, seed=3, start=10)) == []  # an epoch's end is a place to resume from


@pytest.mark.parametrize("batch_size", [0, 2.5])
def test_loader_refuses_a_batch_size_that_is_no_count(batch_size, without_shape_checks):
    """Before: torch's "batch_size should be a positive integer value", naming no argument of ours."""
    data = TokenData(np.arange(41, dtype=np.uint16), np.arange(9, dtype=np.uint16), "tiny")
    with pytest.raises(ValueError, match=rf"^batch_size must be an int >= 1, got {batch_size}$"):
        data.loader("train", n_ctx=4, batch_size=batch_size)


def test_sampler_takes_every_seed_torch_does_in_every_epoch():
    """seed + epoch is taken modulo 2**64, as torch takes a negative seed: the largest seed overflowed
    torch's generator in its second epoch, and -1 must stay the order torch gives 2**64 - 1."""
    assert list(ResumableSampler(10, seed=-1, epoch=0)) == list(ResumableSampler(10, seed=2**64 - 1, epoch=0))
    assert list(ResumableSampler(10, seed=2**64 - 1, epoch=1)) == list(ResumableSampler(10, seed=0, epoch=0))
    assert list(ResumableSampler(10, seed=-(2**63), epoch=3)) == list(ResumableSampler(10, seed=2**63 + 3))


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_loader_gives_whole_batches_and_leaves_the_global_rng_alone():
    data = TokenData(np.arange(41, dtype=np.uint16), np.arange(9, dtype=np.uint16), "tiny")
    loader = data.loader("train", n_ctx=4, batch_size=3, seed=1, pin_memory=True)
    assert loader.pin_memory
    before = torch.get_rng_state()
    batches = list(loader)
    assert torch.equal(torch.get_rng_state(), before)
    assert [tuple(x.shape) for x, _ in batches] == [(3, 4)] * 3  # 10 windows: the tenth is dropped
    assert len(loader) == 3


def test_loader_refuses_a_split_smaller_than_a_batch():
    data = TokenData(np.zeros(1000, dtype=np.uint16), np.zeros(200, dtype=np.uint16), "tiny")
    with pytest.raises(ValueError, match="the val split gives 1 windows per process, fewer than batch_size=4") as val:
        data.loader("val", n_ctx=128, batch_size=4)
    assert str(val.value).endswith("more data or a larger val_fraction (--val-fraction)")
    with pytest.raises(ValueError, match="the train split gives 7 windows per process, fewer than batch_size=8") as t:
        data.loader("train", n_ctx=128, batch_size=8)
    assert str(t.value).endswith("use a smaller batch_size (--batch-size), more data")  # val_fraction: no help
    (x, y), *more = data.loader("val", n_ctx=128, batch_size=1)  # exactly one batch's windows are enough
    assert x.shape == y.shape == (1, 128) and more == []


def test_unigram_loss():
    train = np.array([0, 0, 0, 1])
    val = np.array([0, 1])
    # add-one counts over a vocabulary of 3: p(0) = 4/7, p(1) = 2/7
    expected = -(np.log(4 / 7) + np.log(2 / 7)) / 2
    assert unigram_loss(train, val, vocab_size=3) == pytest.approx(expected)
