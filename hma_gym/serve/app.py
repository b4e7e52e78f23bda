"""`hma-gym serve`: drive the learned simulator live in the browser (aiohttp: one page, one WebSocket)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import weakref
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

from hma_gym.serve.protocol import BadMessage, TokenBucket, parse_message
from hma_gym.serve.session import EpisodeError, Session, SessionSettings

log = logging.getLogger("hma_gym.serve")

SESSIONS = web.AppKey("sessions", dict)
CONFIG = web.AppKey("config", object)
SETTINGS = web.AppKey("settings", SessionSettings)
PAGE = web.AppKey("page", str)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)


@dataclass
class ServeConfig:
    """Serve a local web page that drives the learned env live from the keyboard, the GT env beside it."""

    env: str = "HMA-RobomimicLift-v0"
    """Learned env id (or the GT id of one)."""
    checkpoint: str = ""
    """Learned checkpoint directory (default: the env id's shipped checkpoint)."""
    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only)."""
    port: int = 8000
    """TCP port."""
    gt: bool = True
    """Show the MuJoCo ground truth beside the learned env by default (the page can switch it per episode)."""
    steps: int | None = None
    """MaskGIT unmasking steps per frame (default: the checkpoint's)."""
    temperature: float | None = None
    """Sampling temperature (default: the checkpoint's)."""
    greedy: bool = False
    """Argmax decoding instead of sampling."""
    device: str = "cpu"
    """Torch device of the learned env."""
    threads: int = 1
    """Torch CPU threads (shared by every session)."""
    max_sessions: int = 4
    """Browser tabs served at once; more are turned away."""
    max_steps: int = 1000
    """Steps an episode may run before it must be reset (bounds the memory of the recording)."""
    queue_size: int = 4
    """Actions queued per session while the model works; beyond it the oldest are dropped."""
    messages_per_s: float = 60.0
    """Sustained rate of page messages a session accepts (bursts of twice that); the excess is dropped."""
    allow_origin: list[str] = field(default_factory=list)
    """Web origins besides the page's own that may open sessions (e.g. http://localhost:3000), or * for any;
    by default only the served page itself (and clients that send no Origin, i.e. not a browser) may."""

    def __post_init__(self):
        checks = {"port": 0 <= self.port <= 65535, "threads": self.threads >= 1, "max_sessions": self.max_sessions >= 1,
                  "max_steps": self.max_steps >= 1, "queue_size": self.queue_size >= 1,
                  "messages_per_s": self.messages_per_s > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid serve settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        for origin in self.allow_origin:
            if origin != "*" and parse_origin(origin) is None:
                raise ValueError(f"allow_origin {origin!r} is not a web origin: give scheme://host[:port] "
                                 "(e.g. http://localhost:3000, no path) or *")

    def env_kwargs(self) -> dict:
        """The learned env's arguments, as the action log records them for `play`."""
        kwargs: dict = {"greedy": True} if self.greedy else {}  # else the checkpoint's default
        if self.checkpoint:
            from pathlib import Path

            kwargs["checkpoint"] = str(Path(self.checkpoint).resolve())
        if self.steps is not None:
            kwargs["steps"] = self.steps
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.device != "cpu":
            kwargs["device"] = self.device
        return kwargs


def parse_origin(origin: str, default_scheme: str = "") -> tuple[str, str, int] | None:
    """`scheme://host[:port]` -> (scheme, host, port), ports defaulted by scheme; None if it is not an origin."""
    try:
        parts = urlsplit(origin if "://" in origin else f"{default_scheme}://{origin}")
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query \
            or parts.fragment or parts.username or parts.password:
        return None
    return scheme, parts.hostname, port if port is not None else {"http": 80, "https": 443}[scheme]


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def origin_refusal(request: web.Request, allowed: list[str], loopback_only: bool) -> str | None:
    """Why a request may not be served, or None: the cross-site check behind every route.

    A browser puts the page's origin on every WebSocket handshake (and on script requests to other origins), and
    a page cannot change or drop it, so a handshake whose Origin is neither this server's (the Host it was sent
    to) nor an allowed one comes from another site's page: refused, or any page the user visits could open
    sessions. No Origin means a client that is not a browser page (a script, curl, a test): it acts with the
    user's own rights anyway, so it is served. When the server listens on a loopback address, the Host must
    name this machine too, so a site whose name was re-pointed at 127.0.0.1 (DNS rebinding: its Origin and Host
    then agree) is refused as well.
    """
    if "*" in allowed:
        return None
    admitted = {parse_origin(a) for a in allowed}
    host = parse_origin(request.host, request.scheme)
    if loopback_only and (host is None or not _is_loopback(host[1])) and not any(
            host is not None and host[1:] == a[1:] for a in admitted):
        return (f"Host {request.host!r} is not this machine: the server listens on a loopback address "
                "(--allow-origin ORIGIN admits another name)")
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    parsed = parse_origin(origin)
    if parsed is not None and (parsed == host or parsed in admitted):
        return None
    return (f"Origin {origin!r} is not this server's ({request.scheme}://{request.host}): cross-site requests are "
            "refused; start the server with --allow-origin ORIGIN to admit another origin")


class _Throttle:
    """Error replies to one page are rate limited too, so a flood of bad input cannot make the server flood back."""

    def __init__(self):
        self.bucket = TokenBucket(rate=5, burst=10)
        self.suppressed = 0


async def _send_json(ws: web.WebSocketResponse, message: dict) -> None:
    if ws.closed:
        return
    try:
        await ws.send_str(json.dumps(message))
    except (ConnectionError, RuntimeError):  # the page went away mid-send
        pass


async def _reply_error(ws, throttle: _Throttle, text: str) -> None:
    if throttle.bucket.allow():
        suffix = f" ({throttle.suppressed} more errors not shown)" if throttle.suppressed else ""
        throttle.suppressed = 0
        await _send_json(ws, {"type": "error", "message": text + suffix})
    else:
        throttle.suppressed += 1


async def websocket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    cfg: ServeConfig = app[CONFIG]
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
    await ws.prepare(request)
    sessions: dict[str, Session] = app[SESSIONS]
    if len(sessions) >= cfg.max_sessions:
        await _send_json(ws, {"type": "error", "fatal": True,
                              "message": f"the server already serves {cfg.max_sessions} sessions: close a tab"})
        await ws.close()
        return ws

    async def send(message: dict) -> None:
        await _send_json(ws, message)

    hangups: set = set()  # keeps the hang-up task referenced until it ran
    session = Session(app[SETTINGS], send)
    sessions[session.id] = session
    log.info("session %s opened (%d open)", session.id, len(sessions))
    await send({"type": "hello", "session": session.id, "env_id": cfg.env, "gt": cfg.gt,
                "max_steps": cfg.max_steps})
    runner = asyncio.create_task(session.run())
    runner.add_done_callback(lambda _: hangups.add(asyncio.ensure_future(ws.close())))  # a failed session hangs up
    app[SOCKETS].add(ws)
    rate = TokenBucket(rate=cfg.messages_per_s, burst=2 * cfg.messages_per_s)
    throttle = _Throttle()
    try:
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
            if runner.done():  # the session failed (reported already): nothing left to drive
                break
            if not rate.allow():
                session.note_dropped()
                await _reply_error(ws, throttle, "too many messages: some were dropped")
                continue
            try:
                if msg.type != WSMsgType.TEXT:
                    raise BadMessage("only JSON text messages are accepted")
                if not session.ready:
                    raise BadMessage("the simulator is still loading")
                command = parse_message(msg.data, action_dim=session.env.action_dim)
            except BadMessage as e:
                await _reply_error(ws, throttle, f"rejected: {e}")
                continue
            if command["type"] == "reset":
                session.request_reset(command["seed"], command["gt"])
            else:
                session.request_action(command["action"])
    finally:
        session.stop()
        await runner
        sessions.pop(session.id, None)
        app[SOCKETS].discard(ws)
        if not ws.closed:
            await ws.close()
        log.info("session %s closed (%d open)", session.id, len(sessions))
    return ws


def _session(request: web.Request) -> Session:
    session = request.app[SESSIONS].get(request.match_info["sid"])
    if session is None or not session.ready:
        raise web.HTTPNotFound(text="no such session (closed tabs free theirs)")
    return session


# downloads of a session's current episode: name -> (EnvSession method, content type)
DOWNLOADS = {"actions.json": ("action_log_json", "application/json"), "episode.mp4": ("video_bytes", "video/mp4")}


async def download(request: web.Request) -> web.Response:
    """The current episode's action log (for `hma-gym play --actions`) or its mp4, made on the session's thread."""
    name = request.match_info["name"]
    if name not in DOWNLOADS:
        raise web.HTTPNotFound(text=f"downloads are {sorted(DOWNLOADS)}")
    session = _session(request)
    method, content_type = DOWNLOADS[name]
    try:
        data, seed = await session.call(lambda: (getattr(session.env, method)(), session.env.log.seed))
    except EpisodeError as e:
        raise web.HTTPConflict(text=str(e)) from None
    return web.Response(body=data.encode() if isinstance(data, str) else data, content_type=content_type,
                        headers={"Content-Disposition": f'attachment; filename="hma-seed{seed}-{name}"'})


async def session_count(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    return web.json_response({"sessions": len(sessions), "max_sessions": request.app[CONFIG].max_sessions})


async def index(request: web.Request) -> web.Response:
    return web.Response(text=request.app[PAGE], content_type="text/html")


async def _close_sessions(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def make_app(cfg: ServeConfig) -> web.Application:
    """The web app; every WebSocket connection to /ws is one session with its own envs."""
    if cfg.checkpoint:
        from hma_gym.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(cfg.checkpoint)  # fail at start, not in the first tab
    allowed, loopback_only = list(cfg.allow_origin), _is_loopback(cfg.host)

    @web.middleware
    async def same_origin_only(request: web.Request, handler):
        reason = origin_refusal(request, allowed, loopback_only)
        if reason:
            log.warning("refused %s %s: %s", request.method, request.path, reason)
            raise web.HTTPForbidden(text=reason)
        return await handler(request)

    app = web.Application(middlewares=[same_origin_only])
    app[CONFIG] = cfg
    app[SESSIONS] = {}
    app[SOCKETS] = weakref.WeakSet()
    app[SETTINGS] = SessionSettings(env_id=cfg.env, env_kwargs=cfg.env_kwargs(), show_gt=cfg.gt,
                                    max_steps=cfg.max_steps, queue_size=cfg.queue_size)
    app[PAGE] = resources.files("hma_gym.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/session/{sid}/{name}", download)
    app.router.add_get("/api/sessions", session_count)
    app.on_shutdown.append(_close_sessions)
    return app


def serve(cfg: ServeConfig) -> None:
    import torch

    torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = make_app(cfg)
    print(f"hma-gym serve: open http://{cfg.host}:{cfg.port}/ (Ctrl+C stops)", flush=True)
    web.run_app(app, host=cfg.host, port=cfg.port, print=None)
