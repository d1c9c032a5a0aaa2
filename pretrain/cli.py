"""The one place where an entry point turns a user-facing error into one line and an exit code.

Every `python -m ...` command of the project ends with `raise SystemExit(run(main))`: a
PretrainError (kernels/errors.py) prints `error: <message>` (under several ranks, once, from
rank 0, unless the error is this rank's alone) and exits with the error's code; anything else is a
bug and keeps its traceback.

Exit codes (README, Troubleshooting):
    0  done              2  bad config, argument or data     4  training stopped (bad steps)
    1  other failure     3  checkpoint problem               5  the machine cannot run the config
                                                               (or its disk filled up / went read-only)
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

from kernels.errors import EnvironmentCheckError, PretrainError


def _rank() -> int:
    try:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


def report(error: PretrainError) -> int:
    """Prints the error (one line per problem) and returns its exit code."""
    rank = _rank()
    if rank == 0 or getattr(error, "rank_local", False):
        prefix = f"[rank {rank}] " if rank else ""
        for line in str(error).splitlines() or [type(error).__name__]:
            print(f"{prefix}error: {line}", file=sys.stderr)
    return error.exit_code


# A full or read-only disk is the machine's state, not a bug: one line and exit 5, wherever it hits
# (a checkpoint save names it itself, as a CheckpointError; this catches metrics, logs, exports).
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up", errno.EROFS: "read-only"}


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Calls main(argv); a PretrainError becomes its message and exit code."""
    try:
        return main(argv) or 0
    except PretrainError as e:
        return report(e)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        error = EnvironmentCheckError(
            f"{e.filename or 'a file'}: {e.strerror} ({DISK_ERRORS[e.errno]}); free space or point run.dir / --out at "
            "another filesystem, then continue with --resume auto"
        )
        error.rank_local = True  # another rank may not have hit it
        return report(error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
