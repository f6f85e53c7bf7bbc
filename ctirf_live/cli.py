"""`ctirf` command line: a thin layer over the Python API.

Every command turns user errors (bad config, missing file, impossible optics) into one
line on stderr and exit code 2; set CTIRF_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from ctirf_live import __version__

app = typer.Typer(
    name="ctirf",
    help="Computational TIRF (cTIRF) in the acquisition loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", help="Micro-Manager .cfg (acquisition_configs/ctirf_demo.cfg)"),
]


def user_errors(func: F) -> F:
    """Report expected failures in one line with exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, OSError, KeyError) as exc:
            if os.environ.get("CTIRF_DEBUG"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            err_console.print(f"[bold red]error:[/] {msg}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: work done so far is kept")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print(f"ctirf-live {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Computational TIRF (cTIRF) in the acquisition loop."""


@app.command()
@user_errors
def snap(
    config: ConfigOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="OME-TIFF to write")],
    mode: Annotated[str, typer.Option(help="Illumination preset: EPI or TIRF")] = "EPI",
    objective: Annotated[str | None, typer.Option(help="Objective preset, e.g. 60X")] = None,
    z: Annotated[float | None, typer.Option("--z", help="Focus position (um)")] = None,
    exposure: Annotated[float | None, typer.Option(help="Exposure (ms)")] = None,
) -> None:
    """Snap one EPI or TIRF frame and save it as OME-TIFF with its metadata."""
    from ctirf_live.acquisition.core import check_rig, open_core
    from ctirf_live.acquisition.snap import save_snap
    from ctirf_live.acquisition.snap import snap as snap_frame

    with open_core(config) as core:
        rig = check_rig(core, config)
        image, meta = snap_frame(core, rig, mode, objective, z, exposure)
    path = save_snap(output, image, meta)
    console.print(
        f"saved {path} ({image.shape[1]}x{image.shape[0]} {image.dtype}, {meta['mode']}, "
        f"{meta['optics']['objective']}, pixel {meta['optics']['pixel_size_um'] * 1000:g} nm)"
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
