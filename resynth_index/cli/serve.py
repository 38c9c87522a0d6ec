"""`rsx serve`: the lab as an HTTP service with a web page (the [serve] extra)."""

from __future__ import annotations

from pathlib import Path

import click

from resynth_index.cli.app import cli


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: any free."
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file holding the token every request must carry (needed beyond the loopback).",
)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=50,
    show_default=True,
    help="Largest image accepted; bigger uploads get 413.",
)
@click.option(
    "--gather-ms",
    type=click.IntRange(0, 60_000),
    default=30,
    show_default=True,
    help="How long a query that may need generation waits for others to batch with.",
)
@click.option(
    "--batch-limit",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="Most queries answered in one batch.",
)
@click.pass_context
def serve(ctx, host, port, token_file, max_upload_mb, gather_ms, batch_limit) -> None:
    """Serve the lab over HTTP: a JSON API and a web page, the models kept loaded.

    POST /v1/query answers exactly as 'rsx query --json' does and records the same audit row;
    GET / is the page. It listens on the loopback unless told otherwise; any other --host needs
    --token-file, and then every request needs 'Authorization: Bearer TOKEN' (the page has a
    login form). SIGTERM lets the queries in flight finish, then exits 0.

    \b
    Examples:
      rsx --lab ./lab serve
      rsx --lab ./lab serve --port 9000
      rsx --lab ./lab serve --host 0.0.0.0 --token-file ~/.rsx-token
      curl -F image=@suspect.png -F caption="a lighthouse" http://127.0.0.1:8765/v1/query
    """
    try:
        import python_multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "rsx serve needs the [serve] extra: pip install 'resynth-index[serve]'"
        ) from None
    from resynth_index.lab import Lab
    from resynth_index.service.app import ServiceConfig
    from resynth_index.service.security import check_bind, load_token
    from resynth_index.service.server import serve as run_server

    token = load_token(token_file) if token_file is not None else None
    check_bind(host, token)
    lab_dir = ctx.obj["lab_dir"]
    Lab.open(lab_dir, device=ctx.obj["device"]).close()  # not a lab: one line, before listening
    config = ServiceConfig(
        lab_dir=lab_dir,
        device=ctx.obj["device"],
        token=token,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        gather_s=gather_ms / 1000,
        batch_limit=batch_limit,
    )
    run_server(config, host, port, announce=lambda line: click.echo(line))
