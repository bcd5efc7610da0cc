"""torchrun for torchrun.sh and multinode.sh, quiet about a worker's configuration error.

    python -m src.run.launch [TORCHRUN ARGS...] SCRIPT [ARGS...]

When the first worker to fail exited with code 2 (a configuration or usage error: it has already
printed its one `error:` line), the job ends with exit 2 instead of torchrun's ChildFailedError
report and traceback. Every other failure is reported by torchrun as before.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        if failure.exitcode == 2:
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
