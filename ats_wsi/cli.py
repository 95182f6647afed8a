"""Command-line plumbing: the ``ats-wsi`` console script and what every pipeline shares.

``ats-wsi train|predict|convert|bench ...`` runs the ``python -m pipelines.*`` entry points,
which stay. :func:`run` turns the errors a user can cause (bad manifest, config, checkpoint or
slide, missing file) into one line on stderr naming the file and the problem, exit status 1;
``--debug`` shows the traceback instead. Argument errors exit with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "COMMANDS",
    "CLIError",
    "add_job_arguments",
    "add_mpp_arguments",
    "add_output_arguments",
    "checkpoint_classes",
    "main",
    "make_parser",
    "one_line",
    "output_options",
    "run",
]

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("pipelines.train_slides", "train ATS on a slide cohort (or the demo)"),
    "predict": ("pipelines.predict_slides", "predict slides with a trained checkpoint"),
    "convert": ("pipelines.convert_slide", "convert a slide or image to an OME-Zarr pyramid"),
    "bench": ("pipelines.benchmark", "speed and memory benchmarks"),
}
"""Subcommand -> (module with ``main(argv)``, one-line help)."""


class CLIError(Exception):
    """An expected failure of a command: reported as one line, without a traceback."""


def _expected() -> tuple[type[BaseException], ...]:
    from ats_wsi.config import ConfigError
    from ats_wsi.io.errors import SlideError
    from ats_wsi.slides.manifest import ManifestError

    # OSError covers missing / unreadable files; ValueError the validation errors that name
    # their file (bad checkpoint format, CSV header mismatch, bad settings).
    return (CLIError, ManifestError, ConfigError, SlideError, OSError, ValueError)


def one_line(error: BaseException) -> str:
    """The error as one line: ``file: problem`` where the error names a file."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def make_parser(
    prog: str, doc: str | None, examples: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """A parser whose description is ``doc``'s first paragraph and whose epilog lists
    ``examples``; with ``--debug``."""
    paragraphs = (doc or "").strip().split("\n\n")
    epilog = None
    if examples:
        epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=paragraphs[0],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def add_mpp_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mpp`` (level-0 um/px for slides whose file gives none) and ``--mpp-override``."""
    group = parser.add_argument_group("resolution")
    group.add_argument(
        "--mpp",
        type=_positive_float,
        default=None,
        metavar="UM_PER_PX",
        help="level-0 microns per pixel of slides whose file (and manifest row) give none",
    )
    group.add_argument(
        "--mpp-override",
        action="store_true",
        help="use the manifest's mpp / magnification, else --mpp, even where the file has one",
    )


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Scale-out and shared-folder options of ``predict``."""
    from ats_wsi.slides.locks import DEFAULT_STALE_AFTER_S

    jobs = parser.add_argument_group("scale-out")
    jobs.add_argument("--workers", type=int, default=0, help="dask LocalCluster workers")
    jobs.add_argument("--threads", action="store_true", help="LocalCluster workers as threads")
    jobs.add_argument("--scheduler-address", default=None, help="existing dask scheduler")
    jobs.add_argument("--retry-errors", action="store_true", help="redo slides with an error")
    jobs.add_argument(
        "--lock-timeout",
        type=float,
        default=DEFAULT_STALE_AFTER_S,
        metavar="S",
        help="a claim without heartbeat for S seconds is taken over (default %(default)s)",
    )
    jobs.add_argument(
        "--clear-stale-locks", action="store_true", help="remove dead jobs' claims first"
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``predict`` writes per slide besides its CSV row."""
    outs = parser.add_argument_group("outputs")
    for name in ("heatmaps", "gallery", "zarr"):
        outs.add_argument(f"--no-{name}", action="store_true", help=f"skip {name}/")
    outs.add_argument("--geojson", action="store_true", help="QuPath GeoJSON: patches, cells")
    outs.add_argument("--overlay", action="store_true", help="attention as OME-Zarr pyramid")
    outs.add_argument("--h5", choices=("trident", "clam"), help="sampled patches as h5/<id>.h5")
    outs.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_options(args: argparse.Namespace) -> dict[str, Any]:
    """``PredictOptions`` fields from the :func:`add_output_arguments` flags."""
    return {
        "heatmaps": not args.no_heatmaps,
        "gallery": not args.no_gallery,
        "zarr": not args.no_zarr,
        "geojson": args.geojson,
        "overlay": args.overlay,
        "h5": args.h5,
    }


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def checkpoint_classes(path: str | Path) -> list[str]:
    """Class names of a training checkpoint, or a :class:`CLIError` saying what is wrong."""
    from ats_wsi.slides.inference import get_predictor

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{p}: checkpoint not found")
    try:
        return list(get_predictor(p).classes)
    except Exception as e:  # unpickling, format and state-dict errors all mean the same here
        raise CLIError(f"{p}: not a usable ats_wsi checkpoint ({one_line(e)})") from e


def run(
    body: Callable[[argparse.Namespace], int],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` and run ``body``; expected errors become one line on stderr, status 1."""
    args = parser.parse_args(argv)
    try:
        return int(body(args) or 0)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except _expected() as e:
        if getattr(args, "debug", False):
            raise
        print(f"{parser.prog}: error: {one_line(e)}", file=sys.stderr)
        return 1


def _usage() -> str:
    lines = ["usage: ats-wsi {" + ",".join(COMMANDS) + "} [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "ats-wsi COMMAND --help shows the options and examples of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ats-wsi`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"{_usage()}\n\nats-wsi: error: unknown command {command!r}", file=sys.stderr)
        return 2
    module: Any = importlib.import_module(COMMANDS[command][0])
    if "prog" in inspect.signature(module.main).parameters:
        return int(module.main(rest, prog=f"ats-wsi {command}"))
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
