"""The ``rsx`` command line: click commands that parse, call the Lab and render. Nothing more.

One module per family of commands; importing this package registers them all on the ``cli`` group.
Heavy modules (the lab, models, torch) load inside the commands that need them, so ``rsx --help``
and ``rsx generator list`` start fast.
"""

from resynth_index.cli import (  # noqa: F401  (each module registers its commands)
    audit,
    calibrate,
    demo,
    evaluate,
    generators,
    index,
    ingest,
    lab_commands,
    query,
    serve,
    settings,
    work_orders,
)
from resynth_index.cli.app import cli, main

__all__ = ["cli", "main"]
