"""setup_env.sh's checks before it installs anything, run with stand-ins for `df` and Python."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_tools(tmp_path):
    """A `df` that reports what DF_FREE_KIB says, and a Python that stops at `-m venv` with status 3."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(
        bin_dir / "df",
        '#!/bin/sh\necho "Filesystem 1024-blocks Used Available Capacity Mounted on"\n'
        'echo "/dev/fake 999999999 1 $DF_FREE_KIB 1% /"\n',
    )
    python = write_script(
        bin_dir / "python-stub",
        f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "venv" ]; then exit 3; fi\nexec "{sys.executable}" "$@"\n',
    )
    return bin_dir, python


def run_setup(tmp_path, fake_tools, free_kib: int) -> subprocess.CompletedProcess:
    bin_dir, python = fake_tools
    env = os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "DF_FREE_KIB": str(free_kib),
        "PYTHON": str(python),
        "VENV": str(tmp_path / "venv"),
    }
    return subprocess.run(["bash", str(REPO / "setup_env.sh")], env=env, capture_output=True, text=True, timeout=60)


def test_too_little_disk_is_refused_before_the_environment_is_created(tmp_path, fake_tools):
    result = run_setup(tmp_path, fake_tools, free_kib=300 * 1024)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        f"setup_env.sh: only 300 MiB free in {tmp_path}; {tmp_path / 'venv'} needs about 2 GiB "
        "(free some space, or set VENV=/path/elsewhere)"
    )
    assert "creating" not in result.stdout
    assert not (tmp_path / "venv").exists()


def test_enough_disk_goes_on_to_create_the_environment(tmp_path, fake_tools):
    result = run_setup(tmp_path, fake_tools, free_kib=2 * 1024 * 1024)  # exactly the 2 GiB asked for
    assert result.returncode == 3, result.stderr  # the stand-in Python's `-m venv`: the check let it through
    assert "==> creating" in result.stdout
    assert "MiB free" not in result.stderr
