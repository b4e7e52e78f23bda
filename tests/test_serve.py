"""`hma-gym serve`: message checks, independent sessions over real sockets, and a real headless browser.

The browser test needs Debian's `chromium` and `chromium-driver` (installed by `make setup`); it fails
when they are missing, unless HMA_SKIP_BROWSER=1 is set.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from aiohttp import ClientSession, WSMsgType, WSServerHandshakeError, web
from aiohttp.test_utils import make_mocked_request
from PIL import Image

from hma_gym.action_log import ActionLog
from hma_gym.cli import build_parser, main
from hma_gym.config import dataclass_from_args
from hma_gym.play import make_pair, replay
from hma_gym.serve import ServeConfig, make_app
from hma_gym.serve.app import SESSIONS, origin_refusal
from hma_gym.serve.protocol import MAX_MESSAGE_CHARS, BadMessage, TokenBucket, parse_message
from hma_gym.serve.session import Session, SessionSettings

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- message checks (no server)


@pytest.mark.parametrize("raw, reason", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "JSON object"),
    ('"reset"', "JSON object"),
    ('{"type": "fly"}', "unknown message type"),
    ('{"kind": "action"}', "unknown message type"),
    ('{"type": "action", "action": [NaN, 0, 0, 0, 0, 0, 0]}', "NaN"),
    ('{"type": "action", "action": [0, 0, 0]}', "list of 7"),
    ('{"type": "action", "action": "up"}', "list of 7"),
    ('{"type": "action", "action": [true, 0, 0, 0, 0, 0, 0]}', "numbers"),
    ('{"type": "action", "action": ["1", 0, 0, 0, 0, 0, 0]}', "numbers"),
    ('{"type": "reset", "seed": -1}', "seed must be in"),
    ('{"type": "reset", "seed": 99999999999999999999}', "seed must be in"),
    ('{"type": "reset", "seed": 1.5}', "seed must be an integer"),
    ('{"type": "reset", "seed": "7"}', "seed must be an integer"),
    ('{"type": "reset", "gt": "yes"}', "gt must be"),
    ("[" * 100000, "too long"),
    ("{" + '"a": 1, ' * 1000 + '"type": "reset"}', "too long"),
    (b"\x00\x01", "JSON text"),
])
def test_bad_messages_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(BadMessage, match=reason):
        parse_message(raw, action_dim=7)


def test_deep_nesting_within_the_size_limit_is_rejected_not_crashed():
    raw = "[" * (MAX_MESSAGE_CHARS - 1)
    with pytest.raises(BadMessage):
        parse_message(raw, action_dim=7)


def test_absurd_action_values_are_clamped():
    big = 10**400  # beyond float range
    msg = parse_message(json.dumps({"type": "action", "action": [1e300, -1e300, 0.5, big, -big, -0.25, 3]})
                        .replace("1e+300", "1e999"), action_dim=7)
    assert msg["type"] == "action" and msg["action"].dtype == np.float32
    np.testing.assert_array_equal(msg["action"], np.array([1, -1, 0.5, 1, -1, -0.25, 1], np.float32))


def test_good_messages():
    assert parse_message('{"type": "reset"}', 7) == {"type": "reset", "seed": None, "gt": None}
    assert parse_message('{"type": "reset", "seed": 2147483647, "gt": false}', 7) == {
        "type": "reset", "seed": 2147483647, "gt": False}
    msg = parse_message('{"type": "action", "action": [0, 0.5, -1, 0, 0, 0, 1], "extra": 1}', 7)
    np.testing.assert_array_equal(msg["action"], [0, 0.5, -1, 0, 0, 0, 1])


def test_token_bucket_limits_floods():
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert sum(bucket.allow() for _ in range(100)) == 5
    now[0] += 0.5  # refills 5
    assert sum(bucket.allow() for _ in range(100)) == 5
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


def test_action_flood_keeps_a_bounded_queue_of_the_newest():
    settings = SessionSettings(env_id="HMA-RobomimicLift-v0", env_kwargs={}, show_gt=True, max_steps=10, queue_size=4)

    async def flood():
        session = Session(settings, send=None)
        try:
            for i in range(1000):
                session.request_action(np.full(7, i / 1000, np.float32))
            assert len(session.actions) == 4 and session.dropped == 996
            assert [a[0] for a in session.actions] == pytest.approx([0.996, 0.997, 0.998, 0.999])
            session.request_reset(3, None)  # a reset supersedes what was queued before it
            assert not session.actions and session.pending_reset == {"seed": 3, "gt": None}
        finally:
            session.executor.shutdown()

    asyncio.run(flood())


def test_serve_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="port"):
        ServeConfig(port=70000)
    with pytest.raises(ValueError, match="queue_size"):
        ServeConfig(queue_size=0)
    assert ServeConfig().host == "127.0.0.1"
    for bad in ("localhost:3000", "ftp://localhost", "http://localhost:3000/page", "http://", "http://a:99999"):
        with pytest.raises(ValueError, match="allow_origin .* is not a web origin"):
            ServeConfig(allow_origin=[bad])


@pytest.mark.parametrize("host, origin, allowed, ok", [
    ("127.0.0.1:8000", "http://127.0.0.1:8000", [], True),  # the served page itself
    ("localhost:8000", "http://LOCALHOST:8000", [], True),
    ("127.0.0.1:80", "http://127.0.0.1", [], True),  # default port
    ("127.0.0.1:8000", None, [], True),  # not a browser page (scripts, curl, aiohttp): no Origin to check
    ("127.0.0.1:8000", "https://evil.example", [], False),  # any other site's page
    ("127.0.0.1:8000", "http://127.0.0.1:9000", [], False),  # another port is another origin
    ("127.0.0.1:8000", "https://127.0.0.1:8000", [], False),  # and so is another scheme
    ("127.0.0.1:8000", "http://localhost:8000", [], False),
    ("127.0.0.1:8000", "null", [], False),  # sandboxed iframes, file:// pages
    ("evil.example:8000", "http://evil.example:8000", [], False),  # DNS rebinding: Origin = Host, not this machine
    ("127.0.0.1:8000", "http://localhost:3000", ["http://localhost:3000"], True),
    ("127.0.0.1:8000", "http://localhost:3001", ["http://localhost:3000"], False),
    ("127.0.0.1:8000", "https://evil.example", ["*"], True),
    ("box.lan:8000", "http://box.lan:8000", ["http://box.lan:8000"], True),
])
def test_origin_policy(host, origin, allowed, ok):
    headers = {"Host": host, **({"Origin": origin} if origin else {})}
    reason = origin_refusal(make_mocked_request("GET", "/ws", headers=headers), allowed, loopback_only=True)
    assert (reason is None) == ok, reason
    if not ok:
        assert "--allow-origin" in reason


def test_origin_policy_off_loopback_checks_origin_against_host():
    """Bound to a LAN address, any Host name is this machine's, so only the Origin is compared with it."""
    request = make_mocked_request("GET", "/ws", headers={"Host": "box.lan:8000", "Origin": "http://box.lan:8000"})
    assert origin_refusal(request, [], loopback_only=False) is None
    request = make_mocked_request("GET", "/ws", headers={"Host": "box.lan:8000", "Origin": "http://evil.example"})
    assert "is not this server's (http://box.lan:8000)" in origin_refusal(request, [], loopback_only=False)


# ---------------------------------------------------------------- the app over real sockets


@contextmanager
def running_app(cfg: ServeConfig):
    """The app on a free port, its event loop in a background thread."""
    loop = asyncio.new_event_loop()
    app = make_app(cfg)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def receive_until(ws, want: str, timeout: float = 120.0, errors: list | None = None) -> dict:
    """The next message of type `want` (errors on the way are collected)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        assert msg.type == WSMsgType.TEXT, f"socket ended: {msg}"
        data = json.loads(msg.data)
        if data["type"] == "error" and errors is not None:
            errors.append(data["message"])
        if data["type"] == want:
            return data


async def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def action(*xyz, gripper=-1.0):
    return json.dumps({"type": "action", "action": [*xyz, 0, 0, 0, gripper]})


@pytest.mark.slow
def test_sessions_are_independent_bad_input_is_survived_and_closed_sessions_are_freed(tiny_checkpoint):
    cfg = ServeConfig(checkpoint=str(tiny_checkpoint), max_sessions=2, max_steps=12, queue_size=4)

    async def scenario(app, url):
        sessions = app[SESSIONS]
        async with ClientSession() as http:
            a = await http.ws_connect(url + "/ws")
            b = await http.ws_connect(url + "/ws")
            hello_a, hello_b = await receive_until(a, "hello"), await receive_until(b, "hello")
            assert hello_a["session"] != hello_b["session"] and len(sessions) == 2
            # a third tab is turned away (max_sessions=2) without disturbing the others
            c = await http.ws_connect(url + "/ws")
            refused = await receive_until(c, "error")
            assert refused["fatal"] and "2 sessions" in refused["message"]
            assert (await c.receive(timeout=10)).type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
            await c.close()
            await receive_until(a, "frame")
            await receive_until(b, "frame")  # both started a random episode by themselves

            await a.send_str(json.dumps({"type": "reset", "seed": 1}))
            await b.send_str(json.dumps({"type": "reset", "seed": 2, "gt": False}))
            fa, fb = await receive_until(a, "frame"), await receive_until(b, "frame")
            assert (fa["seed"], fa["step"], fb["seed"], fb["step"]) == (1, 0, 2, 0)
            assert fa["gt"] and fa["psnr"] is not None and fb["gt"] is None and fb["psnr"] is None
            for i in range(3):
                await a.send_str(action(0.5, 0, 0))
                fa = await receive_until(a, "frame")
                assert fa["step"] == i + 1 and fa["learned"] != fb["learned"]
            await b.send_str(action(0, -1, 0))
            fb = await receive_until(b, "frame")
            assert fb["step"] == 1 and fb["seed"] == 2

            # bad input: each is answered with an error, and the session goes on
            errors: list[str] = []
            for bad in ["{oops", '{"type": "warp"}', '{"type": "action", "action": [NaN,0,0,0,0,0,0]}',
                        '{"type": "reset", "seed": -5}', "x" * 5000]:
                await a.send_str(bad)
            await a.send_bytes(b"\x00\xff")
            await a.send_str(json.dumps({"type": "action", "action": [1e308, -1e308, 0, 0, 0, 0, 1e9]}))
            fa = await receive_until(a, "frame", errors=errors)
            assert fa["step"] == 4 and len(errors) == 6, errors
            assert "malformed JSON" in errors[0] and "unknown message type" in errors[1] and "too long" in errors[4]

            # a flood of key events: bounded, the excess dropped, no crash, the other session unaffected
            for _ in range(400):
                await a.send_str(action(0, 0.3, 0))
            await b.send_str(action(0, 0, 0.5))
            fb = await receive_until(b, "frame")
            assert fb["step"] == 2
            fa = await receive_until(a, "frame")
            await wait_for(lambda: not sessions[hello_a["session"]].actions)
            await asyncio.sleep(0.5)
            log_a = json.loads(await (await http.get(f"{url}/session/{hello_a['session']}/actions.json")).text())
            assert sessions[hello_a["session"]].dropped > 0 and 5 <= len(log_a["actions"]) <= 12
            assert log_a["seed"] == 1 and log_a["actions"][3] == [1, -1, 0, 0, 0, 0, 1]  # clamped
            assert log_a["env_kwargs"]["checkpoint"] == str(tiny_checkpoint.resolve())
            log_b = json.loads(await (await http.get(f"{url}/session/{hello_b['session']}/actions.json")).text())
            assert log_b["seed"] == 2 and log_b["actions"] == [[0, -1, 0, 0, 0, 0, -1], [0, 0, 0.5, 0, 0, 0, -1]]
            ActionLog.from_dict(log_b)

            # the episode length is bounded (max_steps=12): more steps are refused until a reset
            for n in range(3, 13):
                await b.send_str(action(0, 0, 0))
                assert (await receive_until(b, "frame"))["step"] == n
            await b.send_str(action(0, 0, 0))
            assert "reached 12 steps" in (await receive_until(b, "error"))["message"]
            video = await http.get(f"{url}/session/{hello_b['session']}/episode.mp4")
            assert video.status == 200 and len(await video.read()) > 1000
            assert (await http.get(f"{url}/session/nope/actions.json")).status == 404

            # closing a tab frees its session and its envs; the other one goes on
            session_a = sessions[hello_a["session"]]
            await a.close()
            await wait_for(lambda: len(sessions) == 1)
            assert session_a.env.closed and session_a.env.learned is None
            assert (await http.get(f"{url}/session/{hello_a['session']}/actions.json")).status == 404
            assert (await (await http.get(url + "/api/sessions")).json())["sessions"] == 1
            await b.send_str(json.dumps({"type": "reset", "seed": 4}))
            await b.send_str(action(0, 0, 1))
            fb = await receive_until(b, "frame")
            fb = await receive_until(b, "frame") if fb["step"] == 0 else fb
            assert (fb["seed"], fb["step"]) == (4, 1)
            await b.close()
            await wait_for(lambda: len(sessions) == 0)

    with running_app(cfg) as (app, url):
        asyncio.run(scenario(app, url))


def test_foreign_origins_are_refused_before_a_session_opens():
    """A WebSocket from another site's page gets HTTP 403 and no session; the page's own origin and an origin
    named with --allow-origin (parsed by the real CLI) get a session."""
    args = build_parser(load="serve").parse_args(["serve", "--allow-origin", "http://localhost:3000"])
    cfg = dataclass_from_args(ServeConfig, args)
    assert cfg.allow_origin == ["http://localhost:3000"]

    async def scenario(app, url):
        sessions = app[SESSIONS]
        async with ClientSession() as http:
            for origin in ("https://evil.example", "http://localhost:3001", url.replace("http:", "https:")):
                with pytest.raises(WSServerHandshakeError) as refused:
                    await http.ws_connect(url + "/ws", origin=origin)
                assert refused.value.status == 403 and not sessions, origin
            response = await http.get(url + "/api/sessions", headers={"Origin": "https://evil.example"})
            assert response.status == 403 and "--allow-origin" in await response.text()
            rebound = url.replace("127.0.0.1", "evil.example")
            with pytest.raises(WSServerHandshakeError) as refused:
                await http.ws_connect(url + "/ws", origin=rebound, headers={"Host": rebound.split("//")[1]})
            assert refused.value.status == 403 and not sessions
            for origin in (url, "http://localhost:3000"):
                ws = await http.ws_connect(url + "/ws", origin=origin)
                assert (await receive_until(ws, "hello"))["session"] in sessions
                await ws.close()
                await wait_for(lambda: not sessions)

    with running_app(cfg) as (app, url):
        asyncio.run(scenario(app, url))


# ---------------------------------------------------------------- a real browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def decode_png(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="session")
def chromium():
    """Headless Debian Chromium through Selenium (nothing is downloaded at run time); checked before the
    tiny checkpoint is built, so a missing browser fails (or HMA_SKIP_BROWSER=1 skips) at once."""
    if os.environ.get("HMA_SKIP_BROWSER") == "1":
        pytest.skip("HMA_SKIP_BROWSER=1")
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not shutil.which(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        pytest.fail(f"the browser test needs {missing}: run `make setup` (apt-get install chromium chromium-driver; "
                    "pip install -e '.[dev]'), or set HMA_SKIP_BROWSER=1 to skip it")

    def start():
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1200,900"):
            options.add_argument(arg)
        return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))

    return start


@contextmanager
def serve_process(checkpoint, tmp_path):
    """`hma-gym serve` for real, in its own process, on a free port."""
    port = free_port()
    out = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hma_gym.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                http_json(url + "/api/sessions")
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()


@pytest.mark.slow
def test_drive_in_a_real_browser_and_replay_the_action_log(chromium, tiny_checkpoint, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium()
    try:
        with serve_process(tiny_checkpoint, tmp_path) as url:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 120, poll_frequency=0.05)
            text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
            src = lambda element_id: driver.find_element(By.ID, element_id).get_attribute("src")  # noqa: E731
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-frames"))
            session = driver.find_element(By.TAG_NAME, "body").get_attribute("data-session")
            assert session and http_json(url + "/api/sessions")["sessions"] == 1

            seed_box = driver.find_element(By.ID, "seed-input")
            seed_box.clear()
            seed_box.send_keys("7")
            driver.find_element(By.ID, "reset-seed").click()
            wait.until(lambda d: text("seed") == "7" and text("step") == "0")
            shown = [(decode_png(src("learned")), decode_png(src("gt")))]

            # one key press, one step: arrows / WASD move x-y, R/F z, Space toggles the gripper, G waits
            body = driver.find_element(By.TAG_NAME, "body")
            keys = [Keys.ARROW_RIGHT, Keys.ARROW_UP, "a", "s", "r", Keys.SPACE, "g", "f", "d"]
            for n, key in enumerate(keys, start=1):
                body.send_keys(key)
                wait.until(lambda d, n=n: text("step") == str(n))
                shown.append((decode_png(src("learned")), decode_png(src("gt"))))
            assert not np.array_equal(shown[0][0], shown[-1][0]), "the learned frames did not change"
            assert text("psnr").endswith("dB") and float(text("rate")) > 0
            assert 0.0 <= float(text("prob").split()[0]) <= 1.0

            # holding a key keeps driving, one action in flight at a time
            ActionChains(driver).key_down(Keys.ARROW_DOWN).perform()
            wait.until(lambda d: int(text("step")) >= len(keys) + 3)
            ActionChains(driver).key_up(Keys.ARROW_DOWN).perform()
            steps, stable_since = -1, time.monotonic()
            while time.monotonic() - stable_since < 1.0:  # the last action in flight lands
                if int(text("step")) != steps:
                    steps, stable_since = int(text("step")), time.monotonic()
                time.sleep(0.05)
            final = (decode_png(src("learned")), decode_png(src("gt")))

            href = driver.find_element(By.ID, "log-link").get_attribute("href")
            assert href == f"{url}/session/{session}/actions.json"
            log_dict = http_json(href)
            log_path = tmp_path / "actions.json"
            log_path.write_text(json.dumps(log_dict))
            log = ActionLog.load(log_path)
            assert log.seed == 7 and len(log.actions) == steps
            m = 0.6  # the page's default step size
            expected = [[0, m, 0], [-m, 0, 0], [0, -m, 0], [m, 0, 0], [0, 0, m], [0, 0, 0], [0, 0, 0], [0, 0, -m],
                        [0, m, 0]]
            got = np.asarray(log.actions)
            np.testing.assert_allclose(got[: len(keys), :3], expected, atol=1e-6)
            assert (got[:5, 6] == -1).all() and (got[5:, 6] == 1).all()  # Space closed the gripper
            np.testing.assert_allclose(got[len(keys):, :3], [[m, 0, 0]] * (steps - len(keys)), atol=1e-6)
            video = urllib.request.urlopen(f"{url}/session/{session}/episode.mp4", timeout=60).read()
            assert len(video) > 1000

            # a second tab is a session of its own; closing it frees it
            first = driver.current_window_handle
            driver.switch_to.new_window("tab")
            driver.get(url + "/")
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-frames"))
            assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-session") != session
            assert http_json(url + "/api/sessions")["sessions"] == 2
            driver.close()
            driver.switch_to.window(first)
            deadline = time.monotonic() + 30
            while http_json(url + "/api/sessions")["sessions"] != 1:
                assert time.monotonic() < deadline, "the closed tab's session was not freed"
                time.sleep(0.1)
            assert int(text("step")) == steps  # the first tab's session is untouched
    finally:
        driver.quit()

    # the downloaded log replays, with `play`'s machinery, to exactly the frames the page showed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server ran
    try:
        learned, gt = make_pair(log.env_id, log.env_kwargs)
        result = replay(log, learned.unwrapped, gt.unwrapped)
        learned.close()
        gt.close()
        for t, (learned_frame, gt_frame) in enumerate(shown):
            np.testing.assert_array_equal(result["learned_frames"][t], learned_frame, err_msg=f"learned frame {t}")
            np.testing.assert_array_equal(result["gt_frames"][t], gt_frame, err_msg=f"GT frame {t}")
        np.testing.assert_array_equal(result["learned_frames"][-1], final[0])
        np.testing.assert_array_equal(result["gt_frames"][-1], final[1])
        main(["play", "--actions", str(log_path), "--out", str(tmp_path / "play.mp4")])
        assert (tmp_path / "play.mp4").stat().st_size > 1000
    finally:
        torch.set_num_threads(threads)
