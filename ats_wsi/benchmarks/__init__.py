"""Benchmarks: speed and memory of ATS against the alternatives, measured side by side.

:data:`BENCHMARKS` is the one registry: benchmark name -> module, imported when asked for
(:func:`load`). ``python -m pipelines.benchmark <name>`` is the command line. Every module has

* ``HELP``: one line for ``--help``;
* ``add_arguments(parser)``: its options (the command line adds ``--quick``, ``--out`` and
  ``--threads`` to every benchmark);
* ``run(args) -> dict``: measure, print a table, return the JSON payload (the command line adds
  the machine description and writes it).

Add a benchmark by writing such a module and one line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["BENCHMARKS", "load"]

BENCHMARKS: dict[str, str] = {
    "core": "ats_wsi.benchmarks.core",
    "slide": "ats_wsi.benchmarks.slide",
    "prefetch": "ats_wsi.benchmarks.prefetch",
    "mnist": "ats_wsi.benchmarks.mnist",
    "encoders": "ats_wsi.benchmarks.encoders",
    "cohort": "ats_wsi.benchmarks.cohort",
    "camelyon": "ats_wsi.benchmarks.camelyon",
}


def load(name: str) -> ModuleType:
    """The module of benchmark ``name`` (``KeyError`` for an unknown name)."""
    return importlib.import_module(BENCHMARKS[name])
