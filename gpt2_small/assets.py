"""Data files shipped inside the package, each checked against SHA256SUMS before use."""

import functools
import hashlib
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "_assets"


class AssetChecksumError(RuntimeError):
    """A bundled file's sha256 differs from the one recorded in _assets/SHA256SUMS."""


def _expected_digests() -> dict[str, str]:
    digests = {}
    for line in (ASSETS_DIR / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            digests[name.lstrip("*")] = digest
    return digests


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_sha256(name: str) -> str:
    """The sha256 that _assets/SHA256SUMS records for the bundled asset `name`."""
    return _expected_digests()[name]


@functools.cache
def asset_path(name: str) -> Path:
    """Path of the bundled asset `name`, after checking its sha256 (once per process)."""
    expected = _expected_digests()
    if name not in expected:
        raise ValueError(f"unknown asset {name!r}; bundled assets are {sorted(expected)}")
    path = ASSETS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"bundled asset {path} is missing; reinstall gpt2_small")
    actual = sha256_of(path)
    if actual != expected[name]:
        raise AssetChecksumError(
            f"{path} has sha256 {actual}, expected {expected[name]} (_assets/SHA256SUMS); "
            f"the file is corrupt or was replaced; reinstall gpt2_small"
        )
    return path
