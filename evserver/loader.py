"""Import the user's app from ``module:attr`` or ``path/to/file.py:attr``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback

from .app import App
from .errors import AppLoadError

__all__ = ["AppLoadError", "load_app"]


def _app_traceback(exc: BaseException) -> str:
    """``exc``'s traceback without the frames of this loader and of importlib: what is left
    starts at the app's own module, as when Python itself reports a failed import."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename != __file__ and "importlib" not in f.filename]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames),
             *traceback.format_exception_only(exc)]
    return "".join(lines).rstrip("\n")


def load_app(spec: str) -> App:
    """Return the ``App`` named by ``spec``; ``attr`` defaults to ``app``.

    A file path is imported under its stem with its directory on ``sys.path``, so the app can
    import its sibling modules, as ``python path/to/file.py`` would allow.
    """
    target, _, attr = spec.rpartition(":") if ":" in spec else (spec, "", "app")
    attr = attr or "app"
    if not target:
        raise AppLoadError(f"bad app spec {spec!r}: expected 'module:attr' or 'file.py:attr'")
    try:
        if target.endswith(".py") or os.sep in target:
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise AppLoadError(f"app file not found: {target}")
            directory, name = os.path.split(path)
            sys.path.insert(0, directory)
            module_name = os.path.splitext(name)[0]
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except AppLoadError:
        raise
    except Exception as exc:
        raise AppLoadError(f"cannot import {target!r}: {type(exc).__name__}: {exc}",
                           _app_traceback(exc)) from exc
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise AppLoadError(f"module {target!r} has no attribute {attr!r}") from None
    if not isinstance(app, App):
        raise AppLoadError(f"{spec!r} is a {type(app).__name__}, not an evserver.App")
    return app
