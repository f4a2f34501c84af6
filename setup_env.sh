#!/usr/bin/env bash
# Create .venv and install gpt2-small with its dev tools (pytest, beartype, ruff).
#
#   bash setup_env.sh                      # torch 2.13.0 from PyPI (CUDA build on Linux, MPS on macOS)
#   TORCH_SPEC="torch==2.13.0" bash setup_env.sh
#   PIP_INDEX_URL=https://download.pytorch.org/whl/cpu bash setup_env.sh   # CPU-only wheels, a much smaller download
#   GPT2_SMALL_UNPINNED=1 bash setup_env.sh   # newest releases within pyproject.toml's ranges, not constraints.txt
#
# torch is installed first and pinned, because an unpinned `torch` pulled in by a dependency
# takes whatever build the index offers first. Re-running the script reuses .venv.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup_env.sh: $("$PYTHON" --version 2>&1) is too old; gpt2-small needs Python >= 3.10 (set PYTHON=...)" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    # A fresh install takes about 1.7 GiB, 0.75 GiB of it torch; pip would otherwise stop midway
    # with "OSError: [Errno 28] No space left on device" and leave a half-built environment.
    venv_parent=$(dirname "$VENV")
    free_kib=$(df -Pk "$venv_parent" 2>/dev/null | awk 'NR == 2 {print $4}')
    if [ -n "$free_kib" ] && [ "$free_kib" -lt $((2 * 1024 * 1024)) ]; then
        echo "setup_env.sh: only $((free_kib / 1024)) MiB free in $venv_parent; $VENV needs about 2 GiB (free some space, or set VENV=/path/elsewhere)" >&2
        exit 1
    fi
    echo "==> creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip

if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "==> torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
else
    echo "==> installing $TORCH_SPEC"
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
fi

# constraints.txt pins the versions the suite was tested with; its numpy and transformers need
# Python >= 3.11, so 3.10 has a tested set of its own.
CONSTRAINTS=constraints.txt
if [ -n "${GPT2_SMALL_UNPINNED:-}" ]; then
    CONSTRAINTS=
    echo "==> GPT2_SMALL_UNPINNED set: newest releases within pyproject.toml's ranges, not constraints.txt"
elif ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    CONSTRAINTS=constraints-py310.txt
    echo "==> Python 3.10: versions from constraints-py310.txt (constraints.txt needs 3.11+)"
fi
echo "==> installing gpt2-small (editable) with dev extras"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]" ${CONSTRAINTS:+-c "$CONSTRAINTS"}

"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
import torch, transformers, gpt2_small
device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
print(f"==> ready: torch {torch.__version__} ({device}), transformers {transformers.__version__}, "
      f"transformer_lens {version('transformer_lens')}")
print("    run the tests with: .venv/bin/pytest tests")
PY
