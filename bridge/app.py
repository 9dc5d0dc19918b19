"""The composition root: build every part from the config, run them, shut down in order.

Start-up order: spool open → recover() (entries left inflight become due) → HTTP
clients → worker → SMTP listener → health endpoint → READY=1 to systemd.

Shutdown (SIGTERM/SIGINT): stop accepting connections → let DATA commands already being
spooled finish and close the remaining sessions (their clients never got a 250, so they
keep their mail) → let delivery attempts in flight finish up to `shutdown_grace` → close
the spool (checkpoint) → exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
import weakref
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import structlog

from bridge import health, providers
from bridge.config import Config
from bridge.delivery import DeliveryWorker, build_clients
from bridge.providers.base import Provider, ProviderSettings
from bridge.smtp import (
    BridgeHandler,
    BridgeSMTP,
    create_smtp_server,
    reload_tls,
    tls_context,
)
from bridge.spool import Spool

__all__ = ["Bridge", "build_accounts", "serve"]

log = structlog.get_logger("bridge.app")


def build_accounts(config: Config) -> dict[str, Provider[ProviderSettings]]:
    """An adapter instance per configured provider account."""
    return {
        name: providers.get(account.type).create(account.settings)
        for name, account in config.providers.items()
    }


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


@dataclass
class Bridge:
    """A running bridge: what `start()` built, for `stop()` and for tests."""

    config: Config
    spool: Spool
    worker: DeliveryWorker
    handler: BridgeHandler
    smtp_server: asyncio.Server
    clients: Mapping[str, httpx.AsyncClient]
    health_server: asyncio.Server | None = None
    sessions: weakref.WeakSet[BridgeSMTP] = field(default_factory=weakref.WeakSet)
    worker_task: asyncio.Task[None] | None = None
    tls: ssl.SSLContext | None = None

    @property
    def smtp_port(self) -> int:
        """The port the SMTP listener is bound to (useful with port 0)."""
        sockname = self.smtp_server.sockets[0].getsockname()
        return int(sockname[1])

    @classmethod
    async def start(
        cls,
        config: Config,
        *,
        smtp_port: int | None = None,
        health_port: int | None = None,
        run_worker: bool = True,
    ) -> Bridge:
        """Build and start everything (see the module docstring for the order)."""
        spool = Spool(
            config.resolve_path(config.spool.path),
            max_entries=config.spool.max_entries,
            min_free_space=config.spool.min_free_space,
            retention=config.spool.retention,
        )
        with _naming("spool.path", spool.path):
            await spool.open(exclusive=True)
        recovered = await spool.recover()
        accounts = build_accounts(config)
        clients = build_clients(config, accounts)
        worker = DeliveryWorker(config, spool, accounts, clients)
        handler = BridgeHandler(config, spool, accounts, on_queued=worker.wake)
        sessions: weakref.WeakSet[BridgeSMTP] = weakref.WeakSet()
        tls = tls_context(config)
        with _naming("listen.host/listen.port", f"{config.listen.host}:{config.listen.port}"):
            server = await create_smtp_server(
                handler, config, port=smtp_port, sessions=sessions, tls_context=tls
            )
        listen = config.listen
        bridge = cls(config, spool, worker, handler, server, clients, sessions=sessions, tls=tls)
        if config.health.enabled:
            with _naming("health.host/health.port", f"{config.health.host}:{config.health.port}"):
                bridge.health_server = await health.serve_health(
                    config.health.host,
                    config.health.port if health_port is None else health_port,
                    bridge.readiness,
                )
        if run_worker:
            bridge.worker_task = asyncio.create_task(worker.run_forever())
        log.info(
            "bridge_started",
            smtp=f"{listen.host}:{bridge.smtp_port}",
            spool=str(spool.path),
            recovered=recovered,
            providers=sorted(config.providers),
        )
        return bridge

    def reload(self) -> None:
        """SIGHUP: re-read the TLS certificate and key (renewed certificates, no restart)."""
        if self.tls is None:
            log.info("reload_ignored", reason="no listen.tls configured")
            return
        try:
            reload_tls(self.tls, self.config)
        except (OSError, ssl.SSLError) as exc:
            # Keep serving with the certificate already loaded.
            log.error("tls_reload_failed", error=str(exc))
            return
        log.info("tls_reloaded")

    async def readiness(self) -> health.HealthReport:
        """Gather the facts for /readyz."""
        try:
            stats = await asyncio.wait_for(self.spool.stats(), timeout=5)
            spool_ok = True
        except Exception:
            return health.readiness(
                listening=self.smtp_server.is_serving(),
                spool_ok=False,
                oldest_due_age=None,
                stale_after=self.config.health.stale_after,
            )
        for state, n in stats.counts.items():
            health.QUEUE_ENTRIES.labels(state=state).set(n)
        now = time.time()
        age = None if stats.next_due_at is None else max(0.0, now - stats.next_due_at)
        return health.readiness(
            listening=self.smtp_server.is_serving(),
            spool_ok=spool_ok,
            oldest_due_age=age,
            stale_after=self.config.health.stale_after,
        )

    async def stop(self) -> int:
        """Graceful shutdown (see the module docstring); returns the attempts cut off."""
        log.info("bridge_stopping")
        self.smtp_server.close()
        if self.health_server is not None:
            self.health_server.close()
        # DATA commands already handed to the spool finish; nobody gets a 250 afterwards.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.handler.idle.wait(), timeout=10)
        for session in list(self.sessions):
            session.shut_down()
        cut_off = await self.worker.stop(self.config.delivery.shutdown_grace)
        if self.worker_task is not None:
            self.worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker_task
        for client in {id(c): c for c in self.clients.values()}.values():
            await client.aclose()
        await self.spool.close()
        log.info("bridge_stopped", attempts_cut_off=cut_off)
        return cut_off


@contextlib.contextmanager
def _naming(keys: str, value: object) -> Iterator[None]:
    """Re-raise an OSError of start-up with the config keys behind it, for the CLI's line."""
    try:
        yield
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, f"{keys} {value}: {reason}") from exc


async def serve(config: Config) -> int:
    """Run the bridge until SIGTERM or SIGINT; returns the exit status."""
    bridge = await Bridge.start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, bridge.reload)
    sd_notify("READY=1")
    watchdog = _watchdog_task()
    try:
        await stop.wait()
    finally:
        sd_notify("STOPPING=1")
        if watchdog is not None:
            watchdog.cancel()
        if await bridge.stop():
            # Attempts cut off at shutdown_grace may still run in worker threads (parsing
            # a huge message), which nothing can interrupt; asyncio.run would wait for
            # them. Their entries are inflight and retried at the next start, so the
            # threads are left behind: a fresh executor for asyncio.run to shut down,
            # and the CLI ends the process without joining the old one.
            loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
    return 0


def _watchdog_task() -> asyncio.Task[None] | None:
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    interval = int(usec) / 2e6

    async def ping() -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.create_task(ping())
