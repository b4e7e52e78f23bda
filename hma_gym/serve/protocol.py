"""The page <-> server messages of `hma-gym serve`, and the checks every incoming message goes through.

Client -> server (JSON text, one object a message):

- `{"type": "reset", "seed": s | null, "gt": true | false}`: start a new episode from the paired start of
  seed `s` (null: a random seed); `gt` shows the ground-truth env beside the learned one (optional).
- `{"type": "action", "action": [dx, dy, dz, droll, dpitch, dyaw, gripper]}`: one env step. Values are
  clipped to [-1, 1] (infinities included); NaN, non-numbers and wrong lengths are rejected.

Server -> client: `hello` (the session id and settings), `status` (a line of text), `frame` (the
images as PNG data URLs and the readouts) and `error` (what was wrong; the session stays open).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

MAX_MESSAGE_CHARS = 4096
MAX_SEED = 2**31 - 1
MESSAGE_TYPES = ("reset", "action")


class BadMessage(ValueError):
    """A message from the page that is rejected (answered with an error; the session stays open)."""


def _reject_constant(name: str):
    raise BadMessage(f"non-standard JSON constant {name}")


def parse_message(raw, action_dim: int) -> dict:
    """Validate one WebSocket message; returns `{"type": "reset", "seed", "gt"}` or `{"type": "action", "action"}`.

    Raises BadMessage (with a readable reason) for anything else.
    """
    if not isinstance(raw, str):
        raise BadMessage("only JSON text messages are accepted")
    if len(raw) > MAX_MESSAGE_CHARS:
        raise BadMessage(f"message too long ({len(raw)} characters, at most {MAX_MESSAGE_CHARS})")
    try:
        msg = json.loads(raw, parse_constant=_reject_constant)
    except BadMessage:
        raise
    except (ValueError, RecursionError) as e:
        raise BadMessage(f"malformed JSON ({e})") from None
    if not isinstance(msg, dict):
        raise BadMessage("a message is a JSON object")
    kind = msg.get("type")
    if kind not in MESSAGE_TYPES:
        raise BadMessage(f"unknown message type {str(kind)[:40]!r}; expected one of {list(MESSAGE_TYPES)}")
    if kind == "reset":
        return {"type": "reset", "seed": parse_seed(msg.get("seed")), "gt": parse_flag(msg.get("gt"), "gt")}
    return {"type": "action", "action": parse_action(msg.get("action"), action_dim)}


def parse_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadMessage(f"seed must be an integer or null. Got {str(seed)[:40]!r}")
    if not 0 <= seed <= MAX_SEED:
        raise BadMessage(f"seed must be in [0, {MAX_SEED}]. Got {str(seed)[:40]}")
    return seed


def parse_flag(value, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise BadMessage(f"{name} must be true, false or absent")


def parse_action(action, action_dim: int) -> np.ndarray:
    """A float32 action of `action_dim` numbers, each clipped to [-1, 1]; NaN and non-numbers are rejected."""
    if not isinstance(action, list) or len(action) != action_dim:
        raise BadMessage(f"action must be a list of {action_dim} numbers")
    values = []
    for x in action:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise BadMessage("action entries must be numbers")
        try:
            x = float(x)
        except OverflowError:  # an integer beyond float range: as far out as it gets
            x = math.inf if x > 0 else -math.inf
        if math.isnan(x):
            raise BadMessage("action entries must not be NaN")
        values.append(x)
    return np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0).astype(np.float32)


class TokenBucket:
    """At most `rate` events a second on average, bursts of `burst`: `allow()` says whether one more fits."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1. Got {rate=}, {burst=}")
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.last = float(burst), clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
