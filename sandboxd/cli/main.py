"""The `sandboxd` command: serve, worker, keys, workers, template."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from sandboxd.config import Settings

app = typer.Typer(help="Self-hostable sandboxes for AI agents.", no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="API keys (each belongs to a user, the tenant).", no_args_is_help=True)
template_app = typer.Typer(help="Template images.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(template_app, name="template")
workers_app = typer.Typer(help="Remote workers (`sandboxd worker`) and their tokens.", no_args_is_help=True)
workers_token_app = typer.Typer(help="Worker tokens: what a worker shows to register.", no_args_is_help=True)
workers_app.add_typer(workers_token_app, name="token")
app.add_typer(workers_app, name="workers")

console = Console(stderr=True)
DataDir = Annotated[
    Optional[Path], typer.Option("--data-dir", envvar="SANDBOXD_DATA_DIR", help="State directory (default /var/lib/sandboxd)")
]
CacheDir = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", envvar="SANDBOXD_CACHE_DIR", help="Template build cache (default /var/cache/sandboxd)"),
]


def _settings(**overrides) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def serve(
    listen: Annotated[Optional[str], typer.Option(help="HOST:PORT to listen on [127.0.0.1:8080]")] = None,
    data_dir: DataDir = None,
    cache_dir: CacheDir = None,
    database: Annotated[
        Optional[str], typer.Option("--database", envvar="SANDBOXD_DATABASE_URL", help="SQLAlchemy URL")
    ] = None,
    no_local_worker: Annotated[bool, typer.Option("--no-local-worker", help="Run the control plane alone")] = False,
    runtime: Annotated[
        Optional[str],
        typer.Option("--runtime", help="Default runtime: oci, gvisor or microvm (crun/runc: oci with that binary) [oci]"),
    ] = None,
    oci_runtime: Annotated[
        Optional[str], typer.Option("--oci-runtime", envvar="SANDBOXD_OCI_RUNTIME", help="Binary of `oci`: crun or runc")
    ] = None,
    advertise: Annotated[Optional[str], typer.Option(help="Host put in sandbox endpoints")] = None,
    cpu_overcommit: Annotated[Optional[float], typer.Option(help="Worker CPU overcommit ratio")] = None,
    memory_overcommit: Annotated[Optional[float], typer.Option(help="Worker memory overcommit ratio")] = None,
    worker_vcpus: Annotated[Optional[float], typer.Option(help="CPUs the local worker offers [all]")] = None,
    worker_memory_mib: Annotated[Optional[int], typer.Option(help="Memory the local worker offers [90%]")] = None,
    reaper_interval: Annotated[Optional[float], typer.Option(help="Seconds between reaper passes")] = None,
    anthropic_base_url: Annotated[
        Optional[str],
        typer.Option(envvar="SANDBOXD_ANTHROPIC_BASE_URL", help="Anthropic endpoint for agents [public API]"),
    ] = None,
    openai_base_url: Annotated[
        Optional[str], typer.Option(envvar="SANDBOXD_OPENAI_BASE_URL", help="OpenAI endpoint for agents [public API]")
    ] = None,
) -> None:
    """Run the API (control plane) with an in-process local worker."""
    import uvicorn

    from sandboxd.api.app import create_app

    settings = _settings(
        listen=listen,
        data_dir=data_dir,
        cache_dir=cache_dir,
        database_url=database,
        local_worker=False if no_local_worker else None,
        oci_runtime=oci_runtime,
        runtime=runtime,
        advertise_address=advertise,
        cpu_overcommit=cpu_overcommit,
        memory_overcommit=memory_overcommit,
        worker_vcpus=worker_vcpus,
        worker_memory_mib=worker_memory_mib,
        reaper_interval_seconds=reaper_interval,
        anthropic_base_url=anthropic_base_url,
        openai_base_url=openai_base_url,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per guest-agent call is noise
    if settings.local_worker:
        _build_template(settings, "standard", force=False)
    host, port = settings.listen_host_port
    console.print(f"sandboxd listening on [bold]http://{host}:{port}[/bold] (data dir {settings.data_dir})")
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        loop="asyncio",  # uvloop spawns subprocesses more slowly, and the worker spawns many
        http="httptools",
        log_level="warning",
        timeout_graceful_shutdown=10,
    )


@app.command()
def worker(
    control_plane: Annotated[
        list[str], typer.Option("--control-plane", help="Control plane URL; repeat for each control plane")
    ],
    token: Annotated[str, typer.Option(envvar="SANDBOXD_WORKER_TOKEN", help="Worker token (`workers token create`)")],
    listen: Annotated[str, typer.Option(help="HOST:PORT of the worker API")] = "0.0.0.0:8081",
    advertise: Annotated[
        Optional[str], typer.Option(help="This host's address, as control planes and clients reach it")
    ] = None,
    data_dir: DataDir = None,
    cache_dir: CacheDir = None,
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="Default runtime: oci, gvisor or microvm (default oci)")] = None,
    oci_runtime: Annotated[
        Optional[str], typer.Option("--oci-runtime", envvar="SANDBOXD_OCI_RUNTIME", help="Binary of `oci`: crun or runc")
    ] = None,
    subnet: Annotated[Optional[str], typer.Option(help="Sandbox addresses (default 10.200.0.0/16)")] = None,
    host_port_base: Annotated[Optional[int], typer.Option(help="First host port (default 30000)")] = None,
    vcpus: Annotated[Optional[float], typer.Option(help="CPUs offered (default all)")] = None,
    memory_mib: Annotated[Optional[int], typer.Option(help="Memory offered (default 90% of RAM)")] = None,
) -> None:
    """Run a worker on this host: it registers with the control plane(s) and serves their calls."""
    import uvicorn

    from sandboxd.worker.server import create_worker_app

    settings = _settings(
        listen=listen, data_dir=data_dir, cache_dir=cache_dir, runtime=runtime, oci_runtime=oci_runtime,
        advertise_address=advertise, subnet=subnet, host_port_base=host_port_base, worker_vcpus=vcpus,
        worker_memory_mib=memory_mib, local_worker=False,
    )  # fmt: skip
    host, port = settings.listen_host_port
    address = advertise or host
    if address in ("0.0.0.0", "::"):
        console.print("[red]error:[/red] --advertise is needed when listening on every address")
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _build_template(settings, "standard", force=False)
    url = f"http://{address}:{port}"
    console.print(f"sandboxd worker at [bold]{url}[/bold] for {', '.join(control_plane)}")
    uvicorn.run(
        create_worker_app(settings, control_plane, token, url), host=host, port=port, loop="asyncio",
        http="httptools", log_level="warning", timeout_graceful_shutdown=10,
    )  # fmt: skip


def _build_template(settings: Settings, name: str, *, force: bool):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from sandboxd.templates.builder import TemplateBuildError, TemplateStore
    from sandboxd.templates.spec import TemplateSpecError, load_template

    try:
        spec = load_template(name, settings.templates_dir)
    except TemplateSpecError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    store = TemplateStore(settings.cache_dir, mirror=settings.mirror)
    current = store.get(name)
    if current is not None and not force and current.digest == store.digest(spec):
        return current
    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), TextColumn("{task.fields[line]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:  # fmt: skip
        task = progress.add_task(f"building template {name}", line="")

        def on_line(line: str) -> None:
            progress.update(task, line=line.strip()[:80])

        try:
            image = store.build(spec, force=force, progress=on_line)
        except TemplateBuildError as exc:
            progress.stop()
            console.print(f"[red]template {name} failed to build:[/red] {exc}")
            raise typer.Exit(1) from None
        progress.update(task, line=f"done: {image.image_name}")
    return image


@template_app.command("build")
def template_build(
    name: str,
    cache_dir: CacheDir = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached")] = False,
) -> None:
    """Build a template (cached by its inputs; --force rebuilds)."""
    settings = _settings(cache_dir=cache_dir)
    image = _build_template(settings, name, force=force)
    typer.echo(f"{image.image_name} {image.rootfs}")


@template_app.command("list")
def template_list(cache_dir: CacheDir = None) -> None:
    """Templates this host knows, and their current builds."""
    from sandboxd.templates.builder import TemplateStore
    from sandboxd.templates.spec import list_templates

    settings = _settings(cache_dir=cache_dir)
    store = TemplateStore(settings.cache_dir, mirror=settings.mirror)
    table = Table("template", "image", "size MiB")
    for name in list_templates(settings.templates_dir):
        image = store.get(name)
        table.add_row(name, image.image_name if image else "(not built)", f"{image.size_bytes / 2**20:.0f}" if image else "")
    Console().print(table)


def _with_store(settings: Settings, action):
    from sandboxd.store.repo import Store

    async def run():
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = Store(settings.effective_database_url)
        try:
            await store.open()
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(run())


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option("--user", help="The user (tenant) the key belongs to")],
    data_dir: DataDir = None,
    database: Annotated[Optional[str], typer.Option("--database", envvar="SANDBOXD_DATABASE_URL")] = None,
) -> None:
    """Create an API key and print it (it is shown only once)."""
    if not user.strip() or len(user) > 128:
        console.print("[red]error:[/red] --user must be 1 to 128 characters")
        raise typer.Exit(2)
    settings = _settings(data_dir=data_dir, database_url=database)
    created = _with_store(settings, lambda store: store.create_key(user.strip()))
    console.print(f"key {created.key_id} for user {created.user_name} ({created.user_id})")
    typer.echo(created.key)


@keys_app.command("list")
def keys_list(
    data_dir: DataDir = None,
    database: Annotated[Optional[str], typer.Option("--database", envvar="SANDBOXD_DATABASE_URL")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, for scripts")] = False,
) -> None:
    """List keys (prefixes only; keys are stored as hashes)."""
    settings = _settings(data_dir=data_dir, database_url=database)
    rows = _with_store(settings, lambda store: store.list_keys())
    if as_json:
        for key, owner in rows:
            typer.echo(json.dumps({
                "key_id": key.id, "prefix": key.prefix, "user": owner.name, "user_id": owner.id,
                "created_at": key.created_at.isoformat(),
                "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
            }))  # fmt: skip
        return
    table = Table("key id", "prefix", "user", "created", "revoked")
    for key, owner in rows:
        table.add_row(key.id, key.prefix + "…", owner.name, key.created_at.isoformat(timespec="seconds"),
                      key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "")  # fmt: skip
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (key_…) or the key's prefix")],
    data_dir: DataDir = None,
    database: Annotated[Optional[str], typer.Option("--database", envvar="SANDBOXD_DATABASE_URL")] = None,
) -> None:
    """Revoke a key; requests with it get 401 from then on."""
    settings = _settings(data_dir=data_dir, database_url=database)
    count = _with_store(settings, lambda store: store.revoke_key(key_id))
    if not count:
        console.print(f"[red]error:[/red] no active key {key_id}")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


Database = Annotated[Optional[str], typer.Option("--database", envvar="SANDBOXD_DATABASE_URL")]


@workers_token_app.command("create")
def workers_token_create(
    name: Annotated[str, typer.Option("--name", help="What the token is for, e.g. the host")] = "worker",
    data_dir: DataDir = None,
    database: Database = None,
) -> None:
    """Create a worker token and print it (shown only once; stored as a hash)."""
    settings = _settings(data_dir=data_dir, database_url=database)
    created = _with_store(settings, lambda store: store.create_worker_token(name.strip()[:128] or "worker"))
    console.print(f"worker token {created.token_id} ({created.name})")
    typer.echo(created.token)


@workers_token_app.command("revoke")
def workers_token_revoke(
    token_id: Annotated[str, typer.Argument(help="Token id (wtk_…) or the token's prefix")],
    data_dir: DataDir = None,
    database: Database = None,
) -> None:
    """Revoke a worker token: its workers' heartbeats are refused, so they go down."""
    settings = _settings(data_dir=data_dir, database_url=database)
    if not _with_store(settings, lambda store: store.revoke_worker_token(token_id)):
        console.print(f"[red]error:[/red] no active worker token {token_id}")
        raise typer.Exit(1)
    console.print(f"revoked {token_id}")


@workers_app.command("list")
def workers_list(
    data_dir: DataDir = None,
    database: Database = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, for scripts")] = False,
) -> None:
    """Workers, their health, capacity and load."""
    settings = _settings(data_dir=data_dir, database_url=database)

    async def gather(store):
        return await store.list_workers(), await store.worker_loads()

    workers, loads = _with_store(settings, gather)
    rows = []
    for w in workers:
        load = loads.get(w.id)
        rows.append({
            "worker_id": w.id, "address": w.address, "url": w.url, "state": w.state, "draining": w.draining,
            "vcpus": w.vcpus, "memory_mib": w.memory_mib, "sandboxes": load.sandboxes if load else 0,
            "used_vcpu": load.vcpu if load else 0.0, "used_memory_mib": load.memory_mib if load else 0,
            "last_heartbeat_at": w.last_heartbeat_at.isoformat(),
        })  # fmt: skip
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table("worker", "address", "state", "sandboxes", "CPU used/offered", "MiB used/offered", "last heartbeat")
    for row in rows:
        state = row["state"] + (" (draining)" if row["draining"] else "")
        table.add_row(row["worker_id"], row["address"], state, str(row["sandboxes"]),
                      f"{row['used_vcpu']:g}/{row['vcpus']:g}", f"{row['used_memory_mib']}/{row['memory_mib']}",
                      row["last_heartbeat_at"])  # fmt: skip
    Console().print(table)


@workers_app.command("drain")
def workers_drain(
    worker_id: Annotated[str, typer.Argument(help="The worker (wrk_…)")],
    undo: Annotated[bool, typer.Option("--undo", help="Take new sandboxes again")] = False,
    data_dir: DataDir = None,
    database: Database = None,
) -> None:
    """Stop placing new sandboxes on a worker; the ones it runs stay until they end."""
    settings = _settings(data_dir=data_dir, database_url=database)
    if not _with_store(settings, lambda store: store.set_worker_draining(worker_id, not undo)):
        console.print(f"[red]error:[/red] no worker {worker_id}")
        raise typer.Exit(1)
    console.print(f"{worker_id} {'takes new sandboxes again' if undo else 'is draining'}")


@app.command()
def shell(
    vm_id: Annotated[str, typer.Argument(help="The sandbox (sbx_...)")],
    url: Annotated[str, typer.Option("--url", envvar="SANDBOXD_URL", help="API base URL")] = "http://127.0.0.1:8080",
    key: Annotated[Optional[str], typer.Option("--key", envvar="SANDBOXD_API_KEY", help="API key")] = None,
    command: Annotated[Optional[str], typer.Option("--command", "-c", help="Run this instead of a login shell")] = None,
    user: Annotated[Optional[str], typer.Option("--user", "-u", help="Sandbox user (default root)")] = None,
) -> None:
    """An interactive terminal in a sandbox (the PTY WebSocket); exits with the shell's code."""
    if not key:
        console.print("[red]error:[/red] an API key is needed: --key or SANDBOXD_API_KEY")
        raise typer.Exit(2)
    raise typer.Exit(asyncio.run(_shell(url, key, vm_id, command, user)))


async def _shell(url: str, key: str, vm_id: str, command: str | None, user: str | None) -> int:
    import os
    import shutil
    import signal
    import termios
    import tty
    from urllib.parse import urlencode

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    cols, rows = shutil.get_terminal_size()
    query = urlencode({k: v for k, v in {"cols": cols, "rows": rows, "command": command, "user": user}.items() if v})
    ws_url = url.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    ws_url = f"{ws_url}/v1/sandboxes/{vm_id}/pty?{query}"
    try:
        ws = await connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None)
    except InvalidStatus as exc:
        try:
            error = json.loads(exc.response.body)["error"]
            console.print(f"[red]error:[/red] {error['code']}: {error['message']}")
        except (ValueError, KeyError, TypeError):
            console.print(f"[red]error:[/red] HTTP {exc.response.status_code}")
        return 1
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot reach {url}: {exc}")
        return 1
    loop = asyncio.get_running_loop()
    stdin_fd = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None
    exit_code = 1
    inbox: asyncio.Queue[bytes | str] = asyncio.Queue()  # bytes: input; str: a JSON control message

    def on_input() -> None:
        data = os.read(stdin_fd, 65536)
        inbox.put_nowait(data)
        if not data:
            loop.remove_reader(stdin_fd)

    def on_winch() -> None:
        c, r = shutil.get_terminal_size()
        inbox.put_nowait(json.dumps({"type": "resize", "cols": c, "rows": r}))

    async def pump_input() -> None:
        while True:
            data = await inbox.get()
            if data == b"":
                return  # local EOF: keep reading output until the remote side ends
            await ws.send(data)

    try:
        if saved is not None:
            tty.setraw(stdin_fd)
            loop.add_signal_handler(signal.SIGWINCH, on_winch)
        try:
            loop.add_reader(stdin_fd, on_input)
        except (PermissionError, ValueError):  # stdin is a regular file: send it whole
            with open(stdin_fd, "rb", closefd=False) as stdin_file:
                inbox.put_nowait(stdin_file.read())
        sender = asyncio.create_task(pump_input())
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    sys.stdout.buffer.write(message)
                    sys.stdout.buffer.flush()
                else:
                    event = json.loads(message)
                    if event.get("type") == "exit":
                        exit_code = int(event.get("exit_code") or 0)
                        break
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
    finally:
        loop.remove_reader(stdin_fd)
        if saved is not None:
            loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        await ws.close()
    return exit_code


def main() -> None:  # pragma: no cover
    sys.exit(app())
