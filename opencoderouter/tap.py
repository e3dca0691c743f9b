"""``twistd opencoderouter``: the Options and ``makeService``, the one place that wires the parts."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import IResource

from . import __version__
from .api import RouterAPI
from .auth import Authentication, Authenticator, LoginForm
from .channel import Limits, RouterSite
from .config import Options, default_username
from .dashboard import Dashboard, DashboardAssets, load_assets
from .events import EventStream
from .exposure import log_startup_warnings, parse_endpoint
from .forwarding import BackendCredentials, Forwarder
from .guard import Guard, GuardedRoot
from .hosts import HostPolicy
from .launcher import Launcher, LauncherSettings, served_port_finder
from .listeners import list_listeners
from .loopback_http import loopback_agent, probe_client
from .mdns import MdnsAdvertiser
from .metrics import RouterMetrics
from .proxy import BackendProxyFactory
from .registry import Naming, Registry, slugify
from .routing import ASSETS_SEGMENT, Router, RouterResource
from .scanner import Prober, Scanner
from .web import WebService

__all__ = ["Options", "makeService"]

log = Logger()




def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Build the router: scanner, registry, web root (API, dashboard, proxy).

    Everything runs on ``reactor``: the global one (twistd), or a test's MemoryReactorClock.
    """
    if reactor is None:
        from twisted.internet import reactor

    top = MultiService()
    registry = Registry(reactor, stale_after=options["stale-after"],
                        naming=Naming(username=options["username"], os_user=default_username()))
    metrics = RouterMetrics(registry)

    owner_filter = options["owner-filter"]
    listen = parse_endpoint(options["listen"])
    authenticator = Authenticator(options["auth-token"], options["basic-users"], clock=reactor)
    backend_credentials = BackendCredentials(
        options["opencode-username"],
        options["opencode-password"],
        may_inject=authenticator.enabled or not listen.beyond_loopback,
    )
    log_startup_warnings(options["listen"], authenticator.enabled, backend_credentials.password is not None,
                         backend_credentials.may_inject)

    port_range = (options["scan-start"], options["scan-end"])
    prober = Prober(
        probe_client(loopback_agent(reactor, options["probe-timeout"])),
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
    forwarder = Forwarder(reactor, backend_timeout=options["backend-timeout"], credentials=backend_credentials,
                          metrics=metrics)
    proxy_factory = BackendProxyFactory(forwarder)
    hosts = HostPolicy(
        registry.by_host_label,
        options["allowed-hosts"],
        listen.interface,
        clock=reactor,
        own_label_suffix=f"-{slugify(options['username'])}",
    )
    router = Router(registry, hosts, login_enabled=authenticator.cookie_flag())
    authentication = Authentication(reactor, authenticator)
    assets = load_assets()
    own_routes: dict[bytes, IResource] = {
        b"api": api.resource(),
        b"metrics": metrics.resource(),
        ASSETS_SEGMENT: DashboardAssets(assets),
    }
    root = RouterResource(router, proxy_factory, own_routes=own_routes, dashboard=Dashboard(assets),
                          login=LoginForm(authentication))
    guard = Guard(hosts, authentication, cors_origins=options["cors-origins"])
    limits = Limits(
        max_url=options["max-url-bytes"],
        max_header_bytes=options["max-header-bytes"],
        max_headers=options["max-headers"],
        max_body=options["max-body-bytes"],
        header_timeout=options["header-timeout"],
    )
    web = WebService(
        options["listen"],
        # Form bodies are forwarded, not parsed: parsing would read a whole upload into memory.
        RouterSite(GuardedRoot(root, guard), router=router, limits=limits, parsePOSTFormSubmission=False,
                   reactor=reactor),
        banner={
            "username": options["username"],
            "scan_start": options["scan-start"],
            "scan_end": options["scan-end"],
            "interval": options["scan-interval"],
        },
        reactor=reactor,
    )
    web.setName("web")
    web.setServiceParent(top)
    if advertiser is not None:
        advertiser.setName("mdns")
        advertiser.setServiceParent(top)
    top.addService(_ClosePoolOnStop(forwarder))
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

    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__()
        self.forwarder = forwarder

    def stopService(self) -> Deferred[None]:
        """Fire once every cached connection has closed."""
        super().stopService()
        return self.forwarder.close()
