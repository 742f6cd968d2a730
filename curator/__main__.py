"""`python -m curator ...`, and `torchrun [...] -m curator fit|score|sketch ...` across processes.

Under torchrun every rank runs the same command (curator/model/distributed.py). Only rank 0
prints results; every rank prints its own errors, prefixed with its rank, and torchrun stops
the job when one rank fails.
"""

from __future__ import annotations

import os
import sys

# The commands that run a model pass over the documents; the others write the catalog
# or read it once and gain nothing from more processes.
DISTRIBUTED_COMMANDS = ("fit", "score", "sketch")


def main() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from curator.cli.app import main as run_cli
        run_cli()
        return
    # The first argument that names a command (an option's value before it is not one).
    command = next((arg for arg in sys.argv[1:] if arg in _command_names()), None)
    if command not in DISTRIBUTED_COMMANDS:
        sys.stderr.write(f"error: under torchrun curator runs {', '.join(DISTRIBUTED_COMMANDS)}; "
                         f"run `curator {command or ''}` as one process\n")
        sys.exit(2)
    from torch.distributed.elastic.multiprocessing.errors import record

    from curator.model import distributed

    @record
    def run_rank() -> None:
        ranks = distributed.start()
        if not ranks.main:
            sys.stdout = open(os.devnull, "w")      # one copy of the results, from rank 0
        os.environ["CURATOR_RANK_PREFIX"] = f"rank {ranks.rank}/{ranks.world}: "
        try:
            from curator.cli.app import main as run_cli
            run_cli()
        finally:
            distributed.stop()

    run_rank()


def _command_names() -> set[str]:
    from curator.cli.app import app

    return ({command.name or command.callback.__name__ for command in app.registered_commands}
            | {group.name for group in app.registered_groups})


if __name__ == "__main__":
    main()
