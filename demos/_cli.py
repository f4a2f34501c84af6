"""What the three demos share on the command line."""

import argparse
import logging
import os
from pathlib import Path

# train_demo writes here and the other two demos read from here, whatever the working directory:
# a cwd-relative default made generate_demo miss a run that train_demo had started elsewhere.
TRAIN_RUN = Path(__file__).resolve().parents[1] / "runs" / "train_demo"


def configure_logging(level: int) -> None:
    """gpt2_small's log at `level` on stderr, as bare lines (at WARNING on a torchrun rank other than
    0); every other library's at WARNING and up.

    Not the root logger at `level`: at INFO it printed httpx's "HTTP Request: HEAD ..." line for every
    request a hub dataset makes. And huggingface_hub and datasets print through handlers of their
    own: passed on to the root's as well, each of their warnings (offline, the hub's five "Retrying
    in 8s") came out twice.
    """
    if os.environ.get("RANK", "0") != "0":
        # Under torchrun only rank 0 reports progress (each rank said it had read the token cache);
        # the others still say what goes wrong.
        level = max(level, logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gpt2_small").setLevel(level)
    for library in ("huggingface_hub", "datasets"):
        logging.getLogger(library).propagate = False


def user_path(text: str) -> str:
    """A directory option's argparse type: "~" expanded. The shell leaves it alone in --out-dir=~/x,
    and the demo would then write to a directory named "~" in the working directory. An empty
    value (an unset variable in --out-dir "$DIR") is refused: it would mean the working directory."""
    if text == "":
        raise argparse.ArgumentTypeError("empty path; name a directory ('.' for the working directory)")
    return str(Path(text).expanduser())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, unless the help already says what the default is.

    Options whose default is worked out at run time (by preset, by dataset size, the newest
    checkpoint) describe it in words; argparse alone would append "(default: None)" after that.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)
