"""`--executor local|ray` and its Ray options, shared by the commands that can generate on Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from resynth_index.distributed.session import RayOptions


def executor_options(command):
    """Add --executor, --ray-address and --ray-actors to ``command``."""
    options = [
        click.option(
            "--executor",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="Run the models here, or on a Ray cluster's actors (the [scale] extra).",
        ),
        click.option(
            "--ray-address",
            metavar="ADDRESS",
            help="With --executor ray: 'auto' joins this node's cluster, HOST:PORT another "
            "(default: start a Ray for this call).",
        ),
        click.option(
            "--ray-actors",
            type=click.IntRange(min=1),
            help="With --executor ray: actors per model (default: the cluster's GPUs, else CPUs).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def ray_options(executor: str, address: str | None, actors: int | None) -> RayOptions | None:
    """The Ray run the options ask for, or None for the local executor (which takes no Ray
    option: a usage error names them)."""
    if executor == "local":
        if address is not None or actors is not None:
            raise click.UsageError("--ray-address and --ray-actors need --executor ray")
        return None
    from resynth_index.distributed.session import RayOptions

    return RayOptions(address=address, actors=actors)
