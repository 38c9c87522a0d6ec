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
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=16_000_000,
    show_default=True,
    help="Largest image, in decoded pixels (read from its header before it is queued).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="Connections open at once; one more is answered 503 and closed.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's headers (else 408).",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds a request's body may pause between two pieces (else the connection closes).",
)
@click.option(
    "--queue-limit",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Queries waiting at most; one more gets 503 with Retry-After.",
)
@click.option(
    "--job-ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds a query may wait for the worker; one not started by then fails with 503.",
)
@click.option(
    "--batch-megapixels",
    type=click.FloatRange(min=0, min_open=True),
    default=64.0,
    show_default=True,
    help="Decoded pixels one batch may hold (memory: about 5 bytes a pixel, per lane).",
)
@click.pass_context
def serve(
    ctx,
    host,
    port,
    token_file,
    max_upload_mb,
    gather_ms,
    batch_limit,
    max_pixels,
    max_connections,
    header_timeout,
    body_timeout,
    queue_limit,
    job_ttl,
    batch_megapixels,
) -> None:
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
    from resynth_index.service.protocol import ConnectionLimits
    from resynth_index.service.security import check_bind, load_token, token_file_warning
    from resynth_index.service.server import listening_socket
    from resynth_index.service.server import serve as run_server

    token = load_token(token_file) if token_file is not None else None
    if token_file is not None and (warning := token_file_warning(token_file)):
        click.echo(warning, err=True)
    check_bind(host, token)
    lab_dir = ctx.obj["lab_dir"]
    Lab.open(lab_dir, device=ctx.obj["device"]).close()  # not a lab: one line, before listening
    sock = listening_socket(host, port)  # a port in use: one line, before the models load
    config = ServiceConfig(
        lab_dir=lab_dir,
        device=ctx.obj["device"],
        token=token,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_pixels,
        gather_s=gather_ms / 1000,
        batch_limit=batch_limit,
        queue_limit=queue_limit,
        job_ttl_s=job_ttl,
        batch_pixels=int(batch_megapixels * 1_000_000),
    )
    limits = ConnectionLimits(
        max_connections=max_connections,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
    )
    run_server(config, sock, host, announce=lambda line: click.echo(line), limits=limits)
