"""The `softprompt` command. To run the service: `up` (the embedded default), `api`, `worker`, `db upgrade`,
`keys`, `tenants`. To use it: the commands of app.client_cli (`datasets`, `tune`, `jobs`, ...)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from typing import Annotated

import typer

from app import client_cli
from app.config import get_settings

cli = typer.Typer(help="softprompt: prompt tuning as a service.", no_args_is_help=True)
db_cli = typer.Typer(help="Registry database.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
keys_cli = typer.Typer(help="Tenants' API keys.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
tenants_cli = typer.Typer(help="Tenants and their quotas.", no_args_is_help=True)
cli.add_typer(tenants_cli, name="tenants")

client_cli.register(cli)

HostOption = Annotated[str, typer.Option(help="Interface to listen on.")]
PortOption = Annotated[int, typer.Option(help="Port to listen on.")]


def _logging() -> None:
    from app.logs import configure_logging

    configure_logging(logging.INFO)


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the registry's migrations."""
    from app.db.migrate import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.registry_url, revision)
    typer.echo(f"registry at {revision}: {_redacted(settings.registry_url)}")


@keys_cli.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="The tenant; created if it is new.")]) -> None:
    """Make a key for a tenant. The key is printed once, alone on the last line; only its hash is kept."""
    from app.db.session import session_scope
    from app.errors import DomainError
    from app.services.tenancy.api_keys import create_key

    try:
        with session_scope(get_settings().registry_url) as session:
            made = create_key(session, tenant=tenant)
            key_id, prefix = made.row.id, made.row.prefix
    except DomainError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"key {key_id} for tenant {tenant} ({prefix}...); it is shown only now:")
    typer.echo(made.key)


@keys_cli.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None) -> None:
    """Every key's id, tenant, visible prefix, and when it was made or revoked (never the key)."""
    from app.db.session import session_scope
    from app.services.tenancy.api_keys import list_keys

    with session_scope(get_settings().registry_url) as session:
        for row in list_keys(session, tenant=tenant):
            revoked = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            typer.echo(
                f"{row.id}\t{row.tenant.name}\t{row.prefix}...\t{row.created_at:%Y-%m-%d %H:%M}\t{revoked}"
            )


@keys_cli.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="The key's id, from `keys list`.")]) -> None:
    """Revoke a key: requests with it are refused from then on."""
    from app.db.session import session_scope
    from app.errors import DomainError
    from app.services.tenancy.api_keys import revoke_key

    try:
        with session_scope(get_settings().registry_url) as session:
            row = revoke_key(session, key_id=key_id)
            typer.echo(f"key {row.id} ({row.prefix}...) of tenant {row.tenant.name} revoked")
    except DomainError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(2) from None


QuotaOption = Annotated[int | None, typer.Option(help="-1 returns it to the server's default.")]


@tenants_cli.command("quota")
def tenants_quota(
    tenant: Annotated[str, typer.Argument(help="The tenant's name.")],
    max_active_jobs: QuotaOption = None,
    upload_bytes_per_hour: QuotaOption = None,
    inference_rps: QuotaOption = None,
) -> None:
    """Show a tenant's quotas, or set some of them; the API applies a change within seconds."""
    from app.db.session import session_scope
    from app.errors import DomainError
    from app.services.tenancy.tenants import caller_of, set_quotas

    settings = get_settings()
    values = {
        "max_active_jobs": max_active_jobs,
        "upload_bytes_per_hour": upload_bytes_per_hour,
        "inference_rps": inference_rps,
    }
    try:
        with session_scope(settings.registry_url) as session:
            row = set_quotas(session, name=tenant, values=values)
            session.flush()
            caller = caller_of(row, settings)
            own = {field: getattr(row, field) for field in values}
    except DomainError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(2) from None
    for field in values:
        where = "" if own[field] is not None else " (server default)"
        typer.echo(f"{field}\t{getattr(caller, field)}{where}")


@cli.command()
def api(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """Run the HTTP API (loads the backbone once at start-up)."""
    import uvicorn

    from app.api.slow_headers import bounded

    _logging()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        http=bounded(get_settings().header_timeout_s),
        log_level="info",
        log_config=None,  # uvicorn's own lines go to the root logger: JSON like everything else
        access_log=False,  # app/api/request_id.py logs each request, with its id
        timeout_graceful_shutdown=get_settings().shutdown_timeout_s,
    )


def _worker_argv() -> list[str]:
    settings = get_settings()
    # Solo pool: one job at a time in this process, the backbone loaded once. Scale with more processes.
    return [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--loglevel=INFO",
        "-Q",
        settings.queue_name,
        "--without-gossip",
        "--without-mingle",
    ]


@cli.command()
def worker() -> None:
    """Run a training worker (Celery); it loads the backbone once and trains one job at a time."""
    from workers.celery_app import celery

    _logging()
    celery.worker_main(_worker_argv())


@cli.command()
def up(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """The embedded default: migrate, then run the API and one worker on this machine."""
    from app.ml.backbone import materialize_backbone

    _logging()
    settings = get_settings()
    db_upgrade()
    name = settings.default_backbone
    typer.echo(f"preparing backbone {name} (the first run converts it once; later runs load it at once)")
    materialize_backbone(name, settings.backbones[name], settings.backbone_cache_dir)
    worker_process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"])
    # uvicorn answers SIGTERM by shutting down, then raises the signal again for the handler it found. The
    # default handler would end this process on the spot, leaving the worker (and the upload parsers) to
    # run on and a second `up` to start another: exit through the `finally` instead.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        api(host=host, port=port)
    finally:
        worker_process.terminate()
        try:
            worker_process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker_process.kill()


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def _redacted(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
