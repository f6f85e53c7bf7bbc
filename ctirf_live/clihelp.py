"""Typer command and group classes whose help shows no `<bool>` placeholder on flags.

Typer prints a value placeholder for every option, `<bool>` for a flag such as
`--overwrite` or `--help`, which reads as if the flag took a value. These classes give
every flag an empty metavar, so the help shows only the flag (and its `--no-` form).
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup


def _blank_flag_metavars(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class FlagCommand(TyperCommand):
    """A command whose flags show no value placeholder in help."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _blank_flag_metavars(super().get_params(ctx))


class FlagGroup(TyperGroup):
    """The top-level group, with the same help for its own flags."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _blank_flag_metavars(super().get_params(ctx))
