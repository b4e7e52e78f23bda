"""`hma-gym serve`: the learned simulator live in the browser, driven from the keyboard, GT beside it."""

from hma_gym.serve.app import ServeConfig, make_app, serve

__all__ = ["ServeConfig", "make_app", "serve"]
