"""One browser tab's env session: its own learned env (and GT env), its own thread, its own action queue.

`EnvSession` owns the envs and the episode record; all its methods run on the session's single worker
thread (MuJoCo's EGL context and the model stay on the thread that made them). `Session` is the asyncio
side: it validates nothing itself (the app does), queues actions with a bound, and pushes each result
to the page as soon as the worker returns it, so a slow model never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import secrets
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from hma_gym.action_log import ActionLog

log = logging.getLogger("hma_gym.serve")


@dataclass
class SessionSettings:
    """What every session of one server shares (taken from ServeConfig)."""

    env_id: str
    env_kwargs: dict
    show_gt: bool
    max_steps: int
    queue_size: int


class EpisodeError(RuntimeError):
    """A request the episode cannot serve (no episode yet, step limit reached); the session stays open."""


def png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class EnvSession:
    """The envs of one session and the record of its current episode (frames, action log, readouts)."""

    def __init__(self, settings: SessionSettings):
        self.settings = settings
        self.learned = self.gt = None
        self.image_key = ""
        self.fps = 20
        self.log: ActionLog | None = None
        self.episode = 0
        self.show_gt = settings.show_gt
        self.frames: dict[str, list[np.ndarray]] = {"learned": [], "gt": []}
        self.psnr: list[float | None] = []
        self.success: list[bool] = []
        self.closed = False

    def open(self) -> None:
        from hma_gym.play import make_pair

        learned, gt = make_pair(self.settings.env_id, self.settings.env_kwargs)
        # the unwrapped envs, as `play` replays them: episodes run on past success and the registered time limit
        self.learned, self.gt = learned.unwrapped, gt.unwrapped
        self.image_key = self.learned.sim.image_key
        self.fps = int(learned.metadata.get("render_fps", 20))

    @property
    def action_dim(self) -> int:
        return int(self.learned.action_space.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.learned.observation_space[self.image_key].shape[0])

    def reset(self, seed: int | None, show_gt: bool | None) -> dict:
        """The paired start of `seed` (a random one when None): GT reset, the learned env from its observation."""
        from hma_gym.play import paired_reset

        seed = secrets.randbelow(2**31) if seed is None else seed
        if show_gt is not None:
            self.show_gt = show_gt
        gt_obs, learned_obs = paired_reset(self.gt, self.learned, seed)
        self.log = ActionLog(env_id=self.settings.env_id, seed=seed, env_kwargs=dict(self.settings.env_kwargs))
        self.episode += 1
        self.frames = {"learned": [learned_obs[self.image_key]], "gt": [gt_obs[self.image_key]] if self.show_gt else []}
        self.psnr, self.success = [], [False]
        return self._frame_message(0.0, False, False, 0.0, 0.0)

    def step(self, action: np.ndarray) -> dict:
        if self.log is None:
            raise EpisodeError("no episode yet: reset first")
        if len(self.log.actions) >= self.settings.max_steps:
            raise EpisodeError(f"the episode has reached {self.settings.max_steps} steps: reset to go on")
        action = np.asarray(action, dtype=np.float32)
        t0 = time.perf_counter()
        obs, _, _, _, info = self.learned.step(action)
        t1 = time.perf_counter()
        self.frames["learned"].append(obs[self.image_key])
        gt_success = None
        if self.show_gt:
            gt_obs, _, _, _, gt_info = self.gt.step(action)
            self.frames["gt"].append(gt_obs[self.image_key])
            gt_success = bool(gt_info["is_success"])
        t2 = time.perf_counter()
        self.log.append(action)
        self.success.append(bool(info["is_success"]))
        return self._frame_message(float(info["success_prob"]), bool(info["is_success"]), gt_success,
                                   1000 * (t1 - t0), 1000 * (t2 - t1) if self.show_gt else None)

    def _frame_message(self, prob: float, success: bool, gt_success: bool | None, learned_ms: float,
                       gt_ms: float | None) -> dict:
        from hma_gym.metrics import psnr

        learned = self.frames["learned"][-1]
        gt = self.frames["gt"][-1] if self.show_gt else None
        value = float(psnr(learned, gt)[0]) if gt is not None else None
        self.psnr.append(value)
        return {"type": "frame", "episode": self.episode, "step": len(self.log.actions), "seed": self.log.seed,
                "learned": png_data_url(learned), "gt": png_data_url(gt) if gt is not None else None,
                "success_prob": prob, "success": success, "gt_success": gt_success, "psnr": value,
                "learned_ms": learned_ms, "gt_ms": gt_ms, "max_steps": self.settings.max_steps}

    def action_log_json(self) -> str:
        if self.log is None:
            raise EpisodeError("no episode yet")
        return self.log.to_json()

    def video_bytes(self) -> bytes:
        """The current episode as an mp4 (GT left when shown, learned right with its PSNR), from reset on."""
        from hma_gym.video import label, side_by_side, write_video

        if self.log is None:
            raise EpisodeError("no episode yet")
        scale = max(1, 256 // self.image_size)
        video = []
        for t, frame in enumerate(self.frames["learned"]):
            value = self.psnr[t]
            tiles = [label(frame, f"HMA t={t}" + (f" {value:.1f}dB" if value is not None else ""), scale,
                           self.success[t])]
            if self.frames["gt"]:
                tiles.insert(0, label(self.frames["gt"][t], f"GT seed {self.log.seed}", scale))
            video.append(side_by_side(tiles, scale=1))
        fd, path = tempfile.mkstemp(suffix=".mp4", prefix="hma-serve-")
        os.close(fd)
        try:
            write_video(path, video, fps=self.fps)
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)

    def close(self) -> None:
        for env in (self.learned, self.gt):
            if env is not None:
                env.close()
        self.learned = self.gt = None
        self.frames = {"learned": [], "gt": []}
        self.closed = True


class Session:
    """The asyncio side of one WebSocket: a bounded action queue drained by one worker thread."""

    def __init__(self, settings: SessionSettings, send):
        self.id = secrets.token_urlsafe(12)
        self.settings = settings
        self.env = EnvSession(settings)
        self.send = send  # async callable taking a JSON-able dict
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hma-serve-{self.id[:6]}")
        self.actions: deque[np.ndarray] = deque()
        self.pending_reset: dict | None = None
        self.wake = asyncio.Event()
        self.closing = False
        self.dropped = 0
        self.ready = False

    async def call(self, fn, *args):
        """Run `fn` on the session's worker thread without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def request_reset(self, seed: int | None, gt: bool | None) -> None:
        self.actions.clear()  # a reset supersedes the actions queued before it
        self.pending_reset = {"seed": seed, "gt": gt}
        self.wake.set()

    def request_action(self, action: np.ndarray) -> None:
        if len(self.actions) >= self.settings.queue_size:
            self.actions.popleft()  # the oldest queued action gives way to the newest intent
            self.dropped += 1
        self.actions.append(action)
        self.wake.set()

    def note_dropped(self, n: int = 1) -> None:
        self.dropped += n

    async def run(self) -> None:
        """Load the envs, then serve resets and steps in arrival order until the page goes away."""
        try:
            await self.send({"type": "status", "text": "loading the learned simulator..."})
            await self.call(self.env.open)
            self.ready = True
            await self.send({"type": "ready", "action_dim": self.env.action_dim, "image_size": self.env.image_size,
                             "env_id": self.settings.env_id, "gt": self.env.show_gt})
            if self.pending_reset is None:
                self.pending_reset = {"seed": None, "gt": None}
            while not self.closing:
                if self.pending_reset is None and not self.actions:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                if self.pending_reset is not None:
                    request, self.pending_reset = self.pending_reset, None
                    job = (self.env.reset, request["seed"], request["gt"])
                else:
                    job = (self.env.step, self.actions.popleft())
                try:
                    message = await self.call(*job)
                except (EpisodeError, ValueError) as e:
                    await self.send({"type": "error", "message": str(e)})
                    continue
                message["dropped"] = self.dropped
                message["queued"] = len(self.actions)
                await self.send(message)
        except Exception as e:  # the envs failed: tell the page; the server and other sessions go on
            log.exception("session %s failed", self.id)
            await self.send({"type": "error", "message": f"session failed: {type(e).__name__}: {e}", "fatal": True})
        finally:
            await self.call(self.env.close)
            self.executor.shutdown(wait=False)

    def stop(self) -> None:
        self.closing = True
        self.wake.set()
