"""``twistd opencoderouter``: the Options and ``makeService``, the one place that wires the parts."""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.resource import IResource
from twisted.web.server import Site

from . import __version__, security
from .api import RouterAPI
from .config import Options, default_username
from .dashboard import ASSETS_SEGMENT, Dashboard, DashboardAssets, load_assets
from .events import EventStream
from .launcher import Launcher, LauncherSettings, served_port_finder
from .mdns import MdnsAdvertiser
from .metrics import MeteredProxyFactory, RouterMetrics
from .proxy import BackendProxyFactory
from .registry import Naming, Registry, slugify
from .routing import RouterResource
from .scanner import Prober, Scanner, list_listeners, loopback_agent

__all__ = ["Options", "makeService"]

log = Logger()


class QuietSite(security.GuardedSite):
    """A guarded Site without a per-request access log line (metrics count requests instead)."""

    noisy = False

    def log(self, request: Any) -> None:
        """Do not write an access log line."""


class WebService(StreamServerEndpointService):
    """Listens for the web root; a port in use aborts start-up with one clear sentence."""

    _raiseSynchronously = True

    def __init__(self, description: str, site: Site, banner: dict[str, Any]) -> None:
        from twisted.internet import reactor

        super().__init__(serverFromString(reactor, description), site)
        self.description = description
        self.banner = banner
        self.listening_port: Any = None
        self._listening_waiters: list[Deferred[Any]] = []

    def when_listening(self) -> Deferred[Any]:
        """Fire with the listening port once the router listens (at once if it already does)."""
        if self.listening_port is not None:
            return succeed(self.listening_port)
        waiter: Deferred[Any] = Deferred()
        self._listening_waiters.append(waiter)
        return waiter

    def privilegedStartService(self) -> None:
        """Listen now, so that a port in use stops twistd before it runs."""
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            reason = error.socketError.strerror if getattr(error.socketError, "strerror", None) else error.socketError
            raise SystemExit(f"opencoderouter: cannot listen on {self.description}: {reason}") from None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.listening_port = port
        address = port.getHost()
        where = f"{getattr(address, 'host', '')}:{getattr(address, 'port', '')}"
        shown_port = getattr(address, "port", "")
        shown_host = "localhost" if getattr(address, "host", "") in ("0.0.0.0", "::", "127.0.0.1") else address.host
        log.info(
            "OpenCodeRouter listening on {where}: dashboard http://{host}:{port}/ , API http://{host}:{port}/api/ , "
            "projects at http://{{slug}}-{username}.local:{port}/ and http://{host}:{port}/{{slug}}/ ; "
            "scanning 127.0.0.1 ports {scan_start}-{scan_end} every {interval:g}s",
            where=where if getattr(address, "port", None) is not None else str(address),
            host=shown_host,
            port=shown_port,
            **self.banner,
        )
        waiters, self._listening_waiters = self._listening_waiters, []
        for waiter in waiters:
            waiter.callback(port)
        return port


class _QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting/Stopping factory" line per backend connection."""

    noisy = False


def quiet_pool(reactor: Any, persistent: bool) -> HTTPConnectionPool:
    """An HTTPConnectionPool that does not log every connection it opens."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietClientFactory
    return pool


def makeService(options: Options) -> MultiService:
    """Build the router: scanner, registry, web root (API, dashboard, proxy)."""
    from twisted.internet import reactor

    top = MultiService()
    registry = Registry(reactor, stale_after=options["stale-after"],
                        naming=Naming(username=options["username"], os_user=default_username()))
    metrics = RouterMetrics(registry)

    owner_filter = options["owner-filter"]
    authenticator = security.Authenticator(options["auth-token"], options["basic-users"])
    backend_credentials = security.BackendCredentials(
        options["opencode-username"],
        options["opencode-password"],
        may_inject=authenticator.enabled or not security.listens_beyond_loopback(options["listen"]),
    )
    security.log_startup_warnings(options["listen"], authenticator, backend_credentials)

    port_range = (options["scan-start"], options["scan-end"])
    probe_pool = quiet_pool(reactor, persistent=False)
    prober = Prober(
        loopback_agent(reactor, probe_pool, options["probe-timeout"]),
        reactor,
        timeout=options["probe-timeout"],
        credentials=backend_credentials.probe_header(),
        trusts=owner_filter.is_self,
        metrics=metrics,
    )
    scanner = Scanner(
        registry,
        prober,
        reactor,
        port_range=port_range,
        interval=options["scan-interval"],
        concurrency=options["scan-concurrency"],
        admit_owner=owner_filter.admits,
        metrics=metrics,
    )
    scanner.setName("scanner")
    scanner.setServiceParent(top)

    launcher = Launcher(
        options["projects"],
        LauncherSettings(
            opencode_bin=options["opencode-bin"],
            port_range=port_range,
            startup_timeout=options["startup-timeout"],
            stop_timeout=options["stop-timeout"],
        ),
        reactor,
        find_served=served_port_finder(registry, prober, port_range, list_listeners),
        used_ports=lambda: [backend.port for backend in registry.backends()],
        slug_for=registry.slug_for_path,
    )
    launcher.setName("launcher")
    launcher.setServiceParent(top)
    registry.subscribe(launcher)
    metrics.watch_launcher(launcher.instances)

    advertiser: MdnsAdvertiser | None = None
    if options["mdns"]:
        advertiser = MdnsAdvertiser(
            registry,
            reactor,
            listening=lambda: web.when_listening(),
            interfaces=options["mdns-interface"],
            refresh_interval=options["scan-interval"],
        )
    events = EventStream(
        registry,
        reactor,
        # Called only for dashboard clients, so after ``web`` below exists.
        router_info=lambda: _router_info(options, web),
        on_open=metrics.dashboard_stream_opened,
        on_close=metrics.dashboard_stream_closed,
        mdns=options["mdns"],
    )
    api = RouterAPI(
        registry,
        extra_health=lambda: {"ignored_other_owners": scanner.ignored_other_owners},
        launcher=launcher,
        mdns=options["mdns"],
        events=events,
    )
    # Every forwarded request is counted at the edge, whatever the proxy does inside.
    proxy_factory = MeteredProxyFactory(
        BackendProxyFactory(reactor, backend_timeout=options["backend-timeout"]), metrics, reactor
    )
    assets = load_assets()
    own_routes: dict[bytes, IResource] = {
        b"api": api.resource(),
        b"metrics": metrics.resource(),
        ASSETS_SEGMENT: DashboardAssets(assets),
    }
    root = RouterResource(
        registry,
        security.with_backend_credentials(proxy_factory, backend_credentials),
        own_routes=own_routes,
        dashboard=Dashboard(assets),
        own_host_names=_own_host_names(),
    )
    guard = security.Guard(
        clock=reactor,
        hosts=security.HostPolicy(
            root.backend_for_host,
            options["allowed-hosts"],
            security.listen_interface(options["listen"]),
            clock=reactor,
            own_label_suffix=f"-{slugify(options['username'])}",
        ),
        authenticator=authenticator,
        cors_origins=frozenset(options["cors-origins"]),
        goes_to_backend=security.goes_to_backend_for(root),
    )
    limits = security.Limits(
        max_url=options["max-url-bytes"],
        max_header_bytes=options["max-header-bytes"],
        max_headers=options["max-headers"],
        max_body=options["max-body-bytes"],
        header_timeout=options["header-timeout"],
    )
    web = WebService(
        options["listen"],
        # Form bodies are forwarded, not parsed: parsing would read a whole upload into memory.
        QuietSite(root, guard=guard, limits=limits, parsePOSTFormSubmission=False),
        banner={
            "username": options["username"],
            "scan_start": options["scan-start"],
            "scan_end": options["scan-end"],
            "interval": options["scan-interval"],
        },
    )
    web.setName("web")
    web.setServiceParent(top)
    if advertiser is not None:
        advertiser.setName("mdns")
        advertiser.setServiceParent(top)
    top.addService(_ClosePoolOnStop(proxy_factory))
    top.addService(_CloseEventStreamsOnStop(events))
    return top


def _router_info(options: Options, web: WebService | None) -> dict[str, Any]:
    """What the dashboard's header shows about this router."""
    port, listen = None, options["listen"]
    if web is not None and web.listening_port is not None:
        address = web.listening_port.getHost()
        port = getattr(address, "port", None)
        host = getattr(address, "host", None)
        if port is not None and host is not None:
            listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "version": __version__,
        "username": options["username"],
        "listen": listen,
        "listen_port": port,
        "scan_start": options["scan-start"],
        "scan_end": options["scan-end"],
        "scan_interval": options["scan-interval"],
        "stale_after": options["stale-after"],
        "mdns": options["mdns"],
        # The page polls GET /api/instances for managed instances when this is true.
        "launcher": True,
    }


def _own_host_names() -> frozenset[str]:
    """This machine's names under ``.local``/``.localhost``: they reach the router itself."""
    short = socket.gethostname().split(".")[0].lower()
    return frozenset({f"{short}.local", f"{short}.localhost"})


class _CloseEventStreamsOnStop(MultiService):
    """Ends open ``/api/events`` streams when the router stops, so dashboards reconnect cleanly."""

    def __init__(self, events: EventStream) -> None:
        super().__init__()
        self.events = events

    def stopService(self) -> Deferred[None]:
        """Finish every stream (synchronous: finishing a request only queues its last bytes)."""
        result = super().stopService()
        self.events.close()
        return result


class _ClosePoolOnStop(MultiService):
    """Closes the proxy's cached backend connections when the router stops."""

    def __init__(self, proxy_factory: BackendProxyFactory) -> None:
        super().__init__()
        self.proxy_factory = proxy_factory

    def stopService(self) -> Deferred[None]:
        """Fire once every cached connection has closed."""
        super().stopService()
        return self.proxy_factory.close()
