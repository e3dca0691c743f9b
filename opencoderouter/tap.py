"""``twistd opencoderouter``: the Options and ``makeService``, the one place that wires the parts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import IResource

from . import __version__
from .agents import AgentWatcher, agent_client
from .api import RouterAPI
from .auth import Authentication, Authenticator, LoginForm
from .channel import Limits, RouterSite
from .child import LauncherSettings
from .config import Options, default_username
from .dashboard import Dashboard, DashboardAssets, load_assets
from .dnssd import DnsSdSettings, WideAreaDirectory, WideAreaRegistrar
from .events import EventStream
from .exposure import log_startup_warnings, parse_endpoint
from .forwarding import BackendCredentials, Forwarder
from .guard import Guard, GuardedRoot
from .hosts import HostPolicy, authority
from .lan import LanView, OwnIdentity
from .lan_mdns import LanBrowser
from .launcher import Launcher, served_port_finder
from .listeners import list_listeners
from .loopback_http import loopback_agent, probe_client
from .mdns import MdnsAdvertiser
from .metrics import RouterMetrics
from .proxy import BackendProxyFactory
from .registry import Backend, Naming, Registry, slugify
from .routing import ASSETS_SEGMENT, Router, RouterResource
from .scanner import Prober, Scanner
from .tasks.service import TaskService
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
    lan_view, lan_services = _lan_directory(options, registry, reactor, lambda: web)
    agents: AgentWatcher | None = None
    if options["agents"]:
        agent_http, agent_pool = agent_client(reactor)
        watcher = agents = AgentWatcher(
            registry,
            reactor,
            agent_http,
            backend_credentials,
            # Called only after start-up, so after ``events`` below exists.
            on_change=lambda slugs: events.publish("agents", watcher.dashboard_json(slugs)),
            pool=agent_pool,
        )
        agents.setName("agents")
        agents.setServiceParent(top)
        metrics.watch_agents(agents.counts)
    events = EventStream(
        registry,
        reactor,
        # Called only for dashboard clients, so after ``web`` below exists.
        router_info=lambda: _router_info(options, web),
        on_open=metrics.dashboard_stream_opened,
        on_close=metrics.dashboard_stream_closed,
        mdns=options["mdns"],
        snapshot_extras=lambda: {"lan": lan_view.to_json(), **(agents.dashboard_json() if agents is not None else {})},
    )
    lan_view.subscribe(lambda change: events.publish("lan", change))
    tasks = _task_service(options, registry, backend_credentials, events)
    api = RouterAPI(
        registry,
        extra_health=lambda: {"ignored_other_owners": scanner.ignored_other_owners},
        launcher=launcher,
        mdns=options["mdns"],
        events=events,
        lan=lan_view,
        tasks=tasks,
        agents=agents,
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
    router = Router(registry, hosts, login_enabled=authenticator.cookie_flag(), mdns=options["mdns"])
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
    for service in lan_services:
        service.setServiceParent(top)
    if tasks is not None:
        tasks.session_link = lambda backend, session_id: _session_link(options, web, backend, session_id)
        tasks.setName("tasks")
        tasks.setServiceParent(top)
    top.addService(_ClosePoolOnStop(forwarder))
    top.addService(_CloseEventStreamsOnStop(events))
    return top


def _lan_directory(options: Options, registry: Registry, reactor: Any,
                   web: Callable[[], WebService]) -> tuple[LanView, list[Service]]:
    """The LAN view and what feeds it: mDNS browsing (--lan-browse), wide-area DNS-SD (--dnssd-*)."""
    services: list[Service] = []
    registrar: WideAreaRegistrar | None = None
    if options["dnssd-domain"] and options["dnssd-key"] is not None:
        settings = DnsSdSettings(options["dnssd-domain"], options["dnssd-server"], options["dnssd-interval"],
                                 options["dnssd-key"])
        registrar = WideAreaRegistrar(registry, reactor, settings, listening=lambda: web().when_listening(),
                                      interfaces=options["mdns-interface"])
        services.append(registrar)

    def own_names() -> set[str]:
        names = {b.mdns_name for b in registry.backends() if b.mdns_name}
        return names | registrar.names() if registrar is not None else names

    view = LanView(reactor, OwnIdentity(own_names, lambda: _listen_port(web())))
    if options["lan-browse"]:
        services.append(LanBrowser(view, reactor, interfaces=options["mdns-interface"],
                                   refresh_interval=options["scan-interval"]))
    if options["dnssd-domain"]:
        settings = DnsSdSettings(options["dnssd-domain"], options["dnssd-server"], options["dnssd-interval"])
        services.append(WideAreaDirectory(view, reactor, settings))
    return view, services


def _listen_port(web: WebService) -> int | None:
    """The router's TCP port, once it listens."""
    if web.listening_port is None:
        return None
    return getattr(web.listening_port.getHost(), "port", None)


def _router_info(options: Options, web: WebService | None) -> dict[str, Any]:
    """What the dashboard's header shows about this router."""
    port, listen = None, options["listen"]
    if web is not None and web.listening_port is not None:
        address = web.listening_port.getHost()
        port = getattr(address, "port", None)
        host = getattr(address, "host", None)
        if port is not None and host is not None:
            listen = authority(host, port)
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
        # .local links work only when mDNS is on and other machines can reach the router.
        "lan_links": options["mdns"] and parse_endpoint(options["listen"]).beyond_loopback,
        # The "On the network" section shows when something feeds the LAN directory.
        "lan": bool(options["lan-browse"] or options["dnssd-domain"]),
        "agents": options["agents"],
        # The page polls GET /api/instances for managed instances when this is true.
        "launcher": True,
        # The Tasks section reads GET /api/tasks when this is true.
        "tasks": bool(options["tasks-dir"] or options["ticktick-token"]),
    }


def _session_link(options: Options, web: WebService, backend: Backend, session_id: str) -> str | None:
    """The session in the web UI through this router (host mode, ``{label}.localhost``), if it listens on TCP."""
    from .tasks.outcome import web_ui_link

    port = _listen_port(web)
    return web_ui_link(backend, port, session_id) if port else None


def _task_service(options: Options, registry: Registry, credentials: BackendCredentials,
                  events: EventStream) -> TaskService | None:
    """The autodispatch service when a task source is configured (``--tasks-dir``, ``--ticktick-token-file``)."""
    from treq.client import HTTPClient
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    from .tasks.budget import RateBudget
    from .tasks.folder import FolderSource
    from .tasks.journal import Journal, JournalError
    from .tasks.service import TaskSettings, TaskSource
    from .tasks.ticktick import TickTickClient, TickTickSource

    if not options["tasks-dir"] and not options["ticktick-token"]:
        return None
    sources: list[TaskSource] = []
    if options["tasks-dir"]:
        sources.append(FolderSource(options["tasks-dir"]))
    if options["ticktick-token"]:
        # Kept-alive connections: one TLS handshake per few polls, not per request.
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
        client = TickTickClient(HTTPClient(Agent(reactor, connectTimeout=10.0, pool=pool)), reactor,
                                options["ticktick-token"], options["ticktick-api"], RateBudget(reactor), pool=pool)
        sources.append(TickTickSource(client, options["ticktick-project"], options["tasks-tag"],
                                      interval=options["tasks-interval"]))
    try:
        journal = Journal(options["state-dir"])
    except JournalError as error:
        raise SystemExit(f"opencoderouter: {error}") from None

    settings = TaskSettings(per_project=options["tasks-per-project"], max_running=options["tasks-max"],
                            permissions=options["tasks-permissions"], timeout=options["tasks-timeout"],
                            wait=options["tasks-wait"])
    # Backends are on the loopback (127.0.0.1 or ::1): no name resolution, no log line per connection.
    http = HTTPClient(loopback_agent(reactor, 10.0))
    return TaskService(journal, registry, reactor, http, sources, settings, credentials=credentials,
                       publish=events.publish)


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
