"""`python -m ctirf_live.training`: `ctirf train` on several GPUs, CPU processes or nodes.

    torchrun --nproc-per-node 4 -m ctirf_live.training --synthetic 200 -o runs/s0
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m ctirf_live.training --data pairs/ -o /shared/runs/s0
    torchrun --nproc-per-node 2 -m ctirf_live.training distill --teacher MODEL ...

The options are those of `ctirf train` (the same command, not a copy); a first word
`finetune` or `distill` runs that command instead. Every process runs the command
inside `distributed.session()`, so the trainer is data-parallel (see
`ctirf_live.training.distributed`); rank 0 alone prints and writes the run folder.
Without torchrun (WORLD_SIZE unset) it is plain `ctirf train`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer

from ctirf_live import cli
from ctirf_live.clihelp import FlagCommand
from ctirf_live.training import distributed, trainer

COMMANDS: dict[str, Callable[..., Any]] = {
    "train": cli.train_command,
    "finetune": cli.finetune,
    "distill": cli.distill,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Run `ctirf train` (or `finetune`/`distill` when named first) in a torchrun session."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = args.pop(0) if args and args[0] in COMMANDS else "train"
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name, cls=FlagCommand)(COMMANDS[name])
    with distributed.session() as run:
        if run is not None and not run.is_main:
            cli.console.quiet = trainer.console.quiet = True
        app(args=args, prog_name=f"python -m ctirf_live.training {name}")


if __name__ == "__main__":
    main()
