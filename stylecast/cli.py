"""The `stylecast` command line: one entry point whose subcommands import their dependencies lazily.

`stylecast serve` must start without importing torch, so nothing heavy is imported here.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from common.version import stylecast_version

# name -> "module:attribute"; modules live in stylecast/commands/ and are imported on first use.
COMMANDS: dict[str, str] = {
    "generate": "stylecast.commands.generate:generate",
    "convert": "stylecast.commands.convert:convert",
    "info": "stylecast.commands.convert:info",
    "train": "stylecast.cli:train",
    "export": "stylecast.cli:export",
    "blend": "stylecast.commands.blend:blend",
    "serve": "stylecast.commands.serve:serve",
    "client": "stylecast.commands.client:client",
    "bench": "stylecast.commands.bench:bench",
    "invert": "stylecast.commands.invert:invert",
    "stylize": "stylecast.commands.stylize:stylize",
}

TRAIN_COMMANDS: dict[str, str] = {
    "nada": "stylecast.commands.train_nada:nada",
    "finetune": "stylecast.commands.train_finetune:finetune",
    "dualstylegan": "stylecast.commands.train_dualstylegan:dualstylegan",
    "gatys": "stylecast.commands.train_style:gatys",
    "fast-style": "stylecast.commands.train_style:fast_style",
    "encoder": "stylecast.commands.train_encoder:encoder",
}

EXPORT_COMMANDS: dict[str, str] = {
    "onnx": "stylecast.commands.export:onnx_cmd",
    "engine": "stylecast.commands.export:engine_cmd",
    "bundle": "stylecast.commands.export:bundle_cmd",
    "verify": "stylecast.commands.export:verify_cmd",
    "fast-style-bundle": "stylecast.commands.export_fast_style:cmd",
    "dualstyle-bundle": "stylecast.commands.export_dualstyle:cmd",
}

# Exceptions that mean "the user asked for something that cannot be done": one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError,
                                                 PermissionError, IsADirectoryError, NotADirectoryError,
                                                 KeyError)

# Top-level modules of the optional extras -> the extra that installs them. `pip install .` is the server-only
# install (serve, client, export verify); a command that needs more says which extra in one line.
EXTRA_FOR_MODULE: dict[str, str] = {
    "torch": "train", "torchvision": "train", "open_clip": "train", "onnx": "train", "safetensors": "train",
    "tqdm": "train", "dlib": "faces", "tensorrt": "gpu", "cuda": "gpu", "onnxsim": "dev",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked (or listed in --help)."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module_name, attr = self.lazy[name].split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.startswith("stylecast.commands"):
                    return _unavailable(name)
                raise
            return getattr(module, attr)
        return super().get_command(ctx, name)


def _unavailable(name: str) -> click.Command:
    @click.command(name=name, help="(not available in this version)")
    def cmd() -> None:
        raise click.UsageError(f"`{name}` is not available in this version of stylecast")
    return cmd


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings=CONTEXT)
@click.version_option(stylecast_version(), prog_name="stylecast")
def cli() -> None:
    """stylecast: train, export and serve StyleGAN stylizers.

    \b
    Example:
      stylecast generate --checkpoint ffhq.pt --seeds 0-3 --outdir out/
    """


@click.group(cls=LazyGroup, lazy=TRAIN_COMMANDS, context_settings=CONTEXT)
def train() -> None:
    """Train or adapt a model (NADA, finetuning, DualStyleGAN, neural style, encoders)."""


@click.group(cls=LazyGroup, lazy=EXPORT_COMMANDS, context_settings=CONTEXT)
def export() -> None:
    """Export to ONNX / TensorRT and build verified serving bundles."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit with code 2."""
    debug = os.environ.get("STYLECAST_DEBUG", "0") == "1"
    try:
        cli.main(args=argv, prog_name="stylecast", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except ModuleNotFoundError as exc:
        extra = EXTRA_FOR_MODULE.get((exc.name or "").partition(".")[0])
        if extra is None or debug:
            raise
        click.echo(f"error: this command needs the {exc.name!r} module, which this install lacks: "
                   f"pip install \"stylecast[{extra}]\"", err=True)
        sys.exit(2)
    except USER_ERRORS as exc:
        if debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        click.echo(f"error: {msg}", err=True)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
