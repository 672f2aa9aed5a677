"""Pieces the training commands share: one-line warnings for skipped data files and the --resume option check."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Mapping

import click


@contextlib.contextmanager
def dataset_warnings(show: bool = True, limit: int = 10) -> Iterator[None]:
    """Show each skipped data file as one 'warning:' line (the first `limit`), also when loading fails; nothing
    where not `show` (the other processes of a torchrun job). Other warnings pass through unchanged."""
    from training.finetune.dataset import DatasetWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        try:
            yield
        finally:
            skipped = [w for w in caught if issubclass(w.category, DatasetWarning)] if show else []
            for w in skipped[:limit]:
                click.echo(f"warning: {w.message}", err=True)
            if len(skipped) > limit:
                click.echo(f"warning: ... and {len(skipped) - limit} more unreadable files", err=True)
            for w in caught:
                if not issubclass(w.category, DatasetWarning):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def resume_changes(ctx: click.Context, fields: Mapping[str, str], mutable: set[str], values: Mapping[str, Any],
                   saved: Any) -> dict[str, Any]:
    """The config fields a --resume command line changes: options given explicitly (command line or environment)
    whose field is in `mutable`; any other explicitly given option that differs from the saved run is an error.

    Args:
        fields: CLI option name -> config field name.
        mutable: fields that may change on resume (e.g. the total length of the run).
        values: the command line's value of every field.
        saved: the run's saved config (a dataclass with those fields).
    Raises:
        ValueError: naming the option, the run's value and the new one.
    """
    changes: dict[str, Any] = {}
    for opt, field_name in fields.items():
        src = ctx.get_parameter_source(opt)
        if src is None or src.name not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        new, old = values[field_name], getattr(saved, field_name)
        if field_name in mutable:
            changes[field_name] = new
        elif new != old:
            raise ValueError(f"--{opt.replace('_', '-')} cannot change on --resume (run has {old!r}, got {new!r}); "
                             "start a new run instead")
    return changes
