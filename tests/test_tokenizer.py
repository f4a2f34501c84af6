"""The bundled GPT-2 tokenizer: exact ids, offline, and refused when its file is corrupt."""

import hashlib
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import tiktoken.load
import torch

import gpt2_small.assets as assets
from gpt2_small import (
    EOT_ID,
    AssetChecksumError,
    get_tokenizer,
    pad_prompts,
    to_single_token,
    to_str_tokens,
    to_string,
    to_strings,
    to_tokens,
)
from gpt2_small.tokenizer import hf_tokenizer


@pytest.fixture
def fresh_caches():
    """Clear the memoised tokenizer and checksums before and after, so the test rebuilds them."""
    get_tokenizer.cache_clear()
    assets.asset_path.cache_clear()
    yield
    get_tokenizer.cache_clear()
    assets.asset_path.cache_clear()


def test_hello_world():
    assert get_tokenizer().encode("Hello world") == [15496, 995]
    tokens = to_tokens("Hello world")
    assert tokens.dtype == torch.long and tokens.tolist() == [[15496, 995]]


def test_known_ids_and_vocab_size():
    enc = get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    assert to_tokens("a<|endoftext|>b").tolist() == [[64, EOT_ID, 65]]


def test_the_hugging_face_tokenizer_gives_the_same_ids_and_names_endoftext_as_gpt2s_does():
    """What export_hf saves beside a checkpoint: GPT2TokenizerFast's ids and special tokens."""
    hf = hf_tokenizer()
    texts = ["Hello world", "naïve café — 東京 🙂", "  x\n\ty", "a<|endoftext|>b"]
    assert [hf(t)["input_ids"] for t in texts] == [get_tokenizer().encode(t, allowed_special="all") for t in texts]
    assert hf("a<|endoftext|>b")["input_ids"] == [64, EOT_ID, 65]  # the special token, not its 7 characters' BPE
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<|endoftext|>",) * 3
    assert hf.bos_token_id == hf.eos_token_id == EOT_ID and len(hf) == 50257


def test_prepend_bos_and_device():
    tokens = to_tokens("Hello world", prepend_bos=True, device="cpu")
    assert tokens.tolist() == [[EOT_ID, 15496, 995]] and tokens.device == torch.device("cpu")


def test_prepend_bos_that_is_no_bool_is_refused(without_shape_checks):
    """Before: "no" was truthy, and <|endoftext|> was put first."""
    for value in ("no", 1, None):
        with pytest.raises(TypeError, match=rf"^prepend_bos must be True or False, got {value!r}$"):
            to_tokens("Hello world", prepend_bos=value)


@pytest.mark.parametrize("text", ["Hello world", "  leading spaces\nand\ttabs", "naïve café — 東京 🙂", "x" * 300])
def test_round_trip(text):
    tokens = to_tokens(text)
    assert to_string(tokens) == text
    assert to_string(tokens[0]) == text
    assert to_string(tokens[0].tolist()) == text


def test_batches_and_str_tokens():
    tokens = torch.tensor([[15496, 995], [995, 15496]])
    assert to_strings(tokens) == ["Hello world", " worldHello"]
    with pytest.raises(ValueError, match="to_strings"):
        to_string(tokens)
    assert to_str_tokens("Hello world") == ["Hello", " world"]
    assert to_str_tokens(tokens[:1]) == ["Hello", " world"]


def test_decoding_names_an_id_that_has_no_text():
    """Before: tiktoken's KeyError for a padded vocabulary's ids (an untrained tiny model's argmax
    picks them), OverflowError for a negative id, and a TypeError about a list for a batch."""
    for decode, tokens in [
        (to_string, [15496, 50300]),
        (to_strings, torch.tensor([[15496], [50300]])),
        (to_str_tokens, torch.tensor([50300])),
    ]:
        with pytest.raises(
            ValueError,
            match=rf"{decode.__name__}: token id 50300 is outside GPT-2's vocabulary \[0, 50257\), so it has no "
            r"text \(ids from 50257 up are a padded vocabulary's unused rows\)",
        ):
            decode(tokens)
    with pytest.raises(ValueError, match=r"to_string: token id -1 is outside .*, so it has no text$"):
        to_string([-1])
    with pytest.raises(
        ValueError, match=r"expects shape \[pos\] or \[1, pos\], got \(2, 2\)\. For a batch use to_strings"
    ):
        to_str_tokens(torch.tensor([[15496, 995], [995, 15496]]))
    with pytest.raises(TypeError, match="to_string decodes integer token ids, got a tensor of dtype torch.float32"):
        to_string(torch.tensor([1.0, 2.0]))
    assert to_string([15496, EOT_ID]) == "Hello<|endoftext|>"  # the last id with text
    with pytest.raises(ValueError, match=r"to_string: token id 50257 is outside .* \(ids from 50257 up are a padded"):
        to_string([EOT_ID + 1])  # the first without


def test_decoding_takes_numpy_ids():
    # what list(np_array) and a token cache hold; with the shape checks on, as the annotations admit them
    assert (
        to_string(np.array([15496, 995])) == to_string(list(np.array([15496, 995], dtype=np.uint16))) == "Hello world"
    )
    assert to_str_tokens(np.array([15496, 995])) == ["Hello", " world"]


def test_one_id_decodes_as_transformer_lens_decodes_it(ref):
    """An int, a numpy int or a 0-d tensor (what argmax() gives), with the shape checks on: the
    annotations admit them. Before: "'int' object is not iterable", and for the tensor "expects
    shape [pos] or [1, pos], got ()"."""
    for one in (15496, np.int64(15496), torch.tensor(15496)):
        assert to_string(one) == ref.bridge.to_string(one) == "Hello"
        assert to_str_tokens(one) == ["Hello"]
    assert ref.bridge.to_str_tokens(torch.tensor(15496)) == ["Hello"]  # its ints are refused; ours give the same


def test_one_id_that_is_no_token_is_refused_as_a_list_s_would_be(without_shape_checks):
    with pytest.raises(TypeError, match="^to_string decodes integer token ids, got True$"):
        to_string(True)
    with pytest.raises(ValueError, match="^to_str_tokens: token id -1 is outside GPT-2's vocabulary"):
        to_str_tokens(torch.tensor(-1))
    with pytest.raises(ValueError, match=r"^to_strings expects shape \[batch, pos\], got \(\)$"):
        to_strings(torch.tensor(15496))  # a batch of texts is never one id


def test_decoding_refuses_bools_and_floats_given_for_ids(without_shape_checks):
    """True is an int to Python (it would decode as id 1, '"'), and int() would truncate 15496.7."""
    with pytest.raises(TypeError, match="^to_string decodes integer token ids, got a tensor of dtype torch.bool$"):
        to_string(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="^to_string decodes integer token ids, got True$"):
        to_string([True, False])
    with pytest.raises(TypeError, match=r"^to_str_tokens decodes integer token ids, got 15496\.7$"):
        to_str_tokens([15496.7])
    assert to_string([1, 0]) == '"!'  # the ints themselves decode


def test_decoding_names_text_given_for_ids(without_shape_checks):
    """Before: "to_string decodes integer token ids, got 'H'", its first character."""
    with pytest.raises(
        TypeError, match=r"^to_string decodes token ids, got the str 'Hello'; encode text with to_tokens$"
    ):
        to_string("Hello")
    with pytest.raises(TypeError, match="^to_strings decodes token ids, got the str 'ab'"):
        to_strings("ab")


@pytest.mark.parametrize("device", ["cuda:99", "gpu"])
def test_a_device_that_is_not_here_is_named(device):
    """Before: torch's "Torch not compiled with CUDA enabled" AssertionError (or its device-string
    RuntimeError), naming no argument."""
    with pytest.raises(ValueError, match=f"device '{device}'"):
        to_tokens("Hello", device=device)
    with pytest.raises(ValueError, match=f"device '{device}'"):
        pad_prompts([[1, 2]], device=device)


@pytest.mark.parametrize("prepend_bos", [False, True])
@pytest.mark.parametrize("text", ["Hello world", " café", "\u2019", "\u65e5\u672c", "\U0001f642"])
def test_str_tokens_equal_the_bridges_where_tokens_split_a_character(ref, text, prepend_bos):
    """A token holding part of a character's UTF-8 bytes shows as U+FFFD, as in TransformerLens,
    not as an empty string: every token keeps a visible label. With prepend_bos, the labels are
    those of to_tokens(text, prepend_bos=True), as TransformerLens's are of its to_tokens."""
    labels = to_str_tokens(text, prepend_bos=prepend_bos)
    assert labels == ref.bridge.to_str_tokens(text, prepend_bos=prepend_bos)
    assert labels == to_str_tokens(to_tokens(text, prepend_bos=prepend_bos))


def test_str_tokens_of_empty_text_are_none_and_prepend_bos_is_for_text_alone(without_shape_checks):
    """Before: to_str_tokens("") raised to_tokens's "pass non-empty text or prepend_bos=True",
    an argument to_str_tokens did not take; and TransformerLens's to_str_tokens(text,
    prepend_bos=True) got Python's bare 'unexpected keyword argument'."""
    assert to_str_tokens("") == to_str_tokens([]) == []
    assert to_str_tokens("", prepend_bos=True) == ["<|endoftext|>"]
    with pytest.raises(ValueError, match=r"^prepend_bos=True applies to text; to_str_tokens decodes token ids as"):
        to_str_tokens([15496, 995], prepend_bos=True)
    with pytest.raises(TypeError, match="prepend_bos"):
        to_str_tokens("Hello", prepend_bos="yes")


@pytest.mark.parametrize("text", [" Mary", " John", "Hello", " the", "<|endoftext|>", "\n"])
def test_to_single_token_equals_the_bridges(ref, text):
    assert to_single_token(text) == ref.bridge.to_single_token(text)


def test_to_single_token_refuses_text_of_several_tokens_or_none(without_shape_checks):
    with pytest.raises(
        ValueError, match=r"^' Julietttt' is 3 tokens, \[38201, 926, 83\] \(\[' Juliet', 'tt', 't'\]\), not one$"
    ):
        to_single_token(" Julietttt")
    with pytest.raises(ValueError, match="'' is 0 tokens"):
        to_single_token("")
    with pytest.raises(TypeError, match="text must be a str, got int"):
        to_single_token(5335)


def test_bad_text():
    with pytest.raises(TypeError, match=r"text[\s\S]*(bytes|b'Hello')"):  # ours or beartype's wording
        to_tokens(b"Hello")
    with pytest.raises(ValueError, match="no tokens"):
        to_tokens("")
    assert to_tokens("", prepend_bos=True).tolist() == [[EOT_ID]]


def test_a_list_of_texts_is_pointed_to_pad_prompts(without_shape_checks):
    """TransformerLens's to_tokens batches a list of texts; here the bare "got list" said nothing
    of how to batch them. The hint's recipe is followed to the letter."""
    texts = ["Hello world", "Hi"]
    with pytest.raises(TypeError, match=r"^text must be a str, got list; for a batch of texts, pad_prompts\("):
        to_tokens(texts)
    with pytest.raises(TypeError, match=r"^text must be a str, got list$"):  # not texts: no recipe
        to_tokens([15496, 995])
    with pytest.raises(TypeError, match=r"^text must be a str, got list$"):  # nor an empty list
        to_tokens([])
    tokens, mask = pad_prompts([get_tokenizer().encode(t) for t in texts])
    assert tokens.tolist() == [[15496, 995], [EOT_ID, 17250]] and mask.tolist() == [[1, 1], [0, 1]]


def test_tokenizer_builds_with_networking_unavailable(monkeypatch, fresh_caches):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(OSError, match="network disabled"):
        socket.create_connection(("example.com", 80))  # the block is in place
    assert get_tokenizer().encode("Hello world") == [15496, 995]


def test_corrupt_ranks_file_is_refused(monkeypatch, tmp_path, fresh_caches):
    corrupt = tmp_path / "assets"
    shutil.copytree(assets.ASSETS_DIR, corrupt)
    data = bytearray((corrupt / "gpt2.tiktoken").read_bytes())
    data[100] ^= 1
    (corrupt / "gpt2.tiktoken").write_bytes(bytes(data))
    monkeypatch.setattr(assets, "ASSETS_DIR", corrupt)
    with pytest.raises(AssetChecksumError, match="gpt2.tiktoken has sha256 [0-9a-f]{64}, expected 306cd27f"):
        get_tokenizer()


def test_a_stale_or_planted_copy_in_tiktokens_cache_is_not_read(monkeypatch, tmp_path, fresh_caches):
    """tiktoken keeps a copy of each ranks file it reads, keyed by the path alone, in a cache any user
    of the machine can write to (/tmp/data-gym-cache unless TIKTOKEN_CACHE_DIR is set), and returns
    it unchecked without the file's hash. Before, both tokenizers read a planted copy, while the
    sha256 checked on the bundled file passed."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    ranks_file = str(assets.asset_path("gpt2.tiktoken"))
    real = Path(ranks_file).read_bytes()
    lines = real.splitlines(keepends=True)
    hello, world = (next(i for i, line in enumerate(lines) if line.endswith(b" %d\n" % rank)) for rank in (15496, 995))
    lines[hello], lines[world] = lines[hello].replace(b" 15496", b" 995"), lines[world].replace(b" 995", b" 15496")
    planted = b"".join(lines)
    copy = tmp_path / hashlib.sha1(ranks_file.encode()).hexdigest()  # where tiktoken keeps it
    copy.write_bytes(planted)
    assert tiktoken.load.read_file_cached(ranks_file) == planted  # what tiktoken alone would read
    assert get_tokenizer().encode("Hello world") == [15496, 995]
    assert copy.read_bytes() == real  # replaced by the file itself
    copy.write_bytes(planted)
    assert hf_tokenizer()("Hello world").input_ids == [15496, 995]


def test_sha256sums_in_binary_mode_and_blank_lines_are_read_and_a_missing_asset_is_named(
    monkeypatch, tmp_path, fresh_caches
):
    """`sha256sum -b` writes "DIGEST *NAME"; a hand-edited file may end in blank lines."""
    (tmp_path / "a.txt").write_bytes(b"some data\n")
    digest = assets.sha256_of(tmp_path / "a.txt")
    (tmp_path / "SHA256SUMS").write_text(f"{digest} *a.txt\n\n{'0' * 64}  gone.txt\n\n")
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path)
    assert assets.asset_path("a.txt") == tmp_path / "a.txt"
    with pytest.raises(FileNotFoundError, match=r"^bundled asset .*gone\.txt is missing; reinstall gpt2_small$"):
        assets.asset_path("gone.txt")


def test_every_bundled_asset_matches_its_checksum(fresh_caches):
    for name in ("gpt2.tiktoken", "shakespeare.txt.gz"):
        assert assets.sha256_of(assets.asset_path(name)) == assets._expected_digests()[name]
    with pytest.raises(ValueError, match="unknown asset 'nope'"):
        assets.asset_path("nope")
