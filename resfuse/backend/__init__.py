"""Backend registry and choice.

A backend implements the *pieces* of the fused ops (see `base.Backend`); `resfuse/ops.py`
composes them. The names: `eager` (torch ops on any device; the CPU path), `triton`, `cuda`,
and `pieces` (every piece exactly as written out in `base.Backend`: the reference the kernel
backends replace piece by piece, for tests; slow, never chosen by `auto`). `auto` picks, per
call, the first backend in `AUTO_ORDER` that is available and supports the case, and never the
Triton interpreter: on a CPU tensor `auto` is `eager`. (This package is `resfuse.backend`;
`resfuse.backends()` is the function that reports on it.)

The choice, strongest first: the op's `backend=` argument, the innermost `use_backend(...)`
scope, the `RESFUSE_BACKEND` environment variable (read at each call), then `auto`. A forced
backend that cannot run the case raises `BackendUnavailable` with the reason; `auto` falls
through to the next one instead.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Dict, Iterator, Optional

import torch

from .base import Backend, BackendUnavailable, Case
from .cuda import CudaBackend
from .eager import EagerBackend
from .triton import TritonBackend

NAMES = ("eager", "triton", "cuda", "pieces")
# Fastest first; `auto` takes the first that is available and supports the case.
AUTO_ORDER = ("cuda", "triton", "eager")

# `cuda` is always registered; it reports itself unavailable where resfuse._C does not load
# (and why) or no GPU is visible.
# `triton` likewise: unavailable without triton, or without a GPU unless TRITON_INTERPRET=1.
_registry: Dict[str, Backend] = {"eager": EagerBackend(), "cuda": CudaBackend(),
                                 "triton": TritonBackend(), "pieces": Backend()}

# Backends not registered in this version, with a function that says why.
_unavailable: Dict[str, object] = {}
_scope: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("resfuse_backend", default=None)


def register(backend: Backend) -> None:
    """Add (or replace) a backend under its `name`."""
    if backend.name not in NAMES:
        raise ValueError(f"backend name must be one of {NAMES}, got {backend.name!r}")
    _registry[backend.name] = backend
    _unavailable.pop(backend.name, None)


def _status(name: str) -> Optional[str]:
    """None when usable, else why not."""
    if name in _registry:
        return _registry[name].unavailable_reason()
    why = _unavailable.get(name)
    return why() if why is not None else "unknown backend"


def backends() -> Dict[str, str]:
    """{'eager': 'ok', 'triton': 'not available: …', 'cuda': '…'} — what can run, and why not."""
    out = {}
    for name in NAMES:
        why = _status(name)
        out[name] = "ok" if why is None else why
    return out


def _check_name(name: str, where: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in NAMES:
        raise ValueError(f"{where}: expected one of {('auto',) + NAMES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a `with` block (thread- and task-local)."""
    token = _scope.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _scope.reset(token)


def requested(backend: Optional[str] = None) -> str:
    """The name asked for by the call, scope or environment ('auto' when none)."""
    if backend is not None:
        return _check_name(backend, "backend")
    scoped = _scope.get()
    if scoped is not None:
        return scoped
    if "RESFUSE_BACKEND" in os.environ:  # (no KeyError raised and caught on every call)
        env = os.environ["RESFUSE_BACKEND"]
        if env:
            return _check_name(env, "RESFUSE_BACKEND")
    return "auto"


def get(name: str) -> Backend:
    """A registered, available backend by name (for the ops, which receive a resolved name)."""
    if name not in _registry:
        raise BackendUnavailable(f"resfuse backend {name!r}: {_status(name)}")
    return _registry[name]


@torch.compiler.assume_constant_result
def _selected_name(op: str, device_type: str, dtype: torch.dtype, channels_last: bool,
                   groups: int, training: bool, backend: Optional[str]) -> str:
    # The Case's fields one by one: dynamo hands a NamedTuple argument to a constant-result
    # function without its fields (an IndexError reading them).
    return select(Case(op, device_type, dtype, channels_last, groups, training), backend).name


def select_for_call(case: Case, backend: Optional[str] = None) -> Backend:
    """`select`, as the public functions call it. Under torch.compile the choice is made once,
    while tracing, and kept in the compiled graph (the scope's ContextVar and the environment
    cannot be traced): a different `use_backend` scope or RESFUSE_BACKEND later needs a new
    `torch.compile` (or `torch.compiler.reset()`) to take effect."""
    if torch.compiler.is_compiling():
        return _registry[_selected_name(*case, backend)]
    return select(case, backend)


def select(case: Case, backend: Optional[str] = None) -> Backend:
    """The backend that runs `case`."""
    name = requested(backend)
    if name != "auto":
        why = _status(name)
        if why is None:
            why = _registry[name].unsupported_reason(case)
        if why is not None:
            raise BackendUnavailable(f"resfuse backend {name!r} cannot run this call: {why}")
        return _registry[name]
    for candidate in AUTO_ORDER:  # never "pieces"
        be = _registry.get(candidate)
        if be is None or not be.auto_eligible(case) or be.unavailable_reason() is not None:
            continue
        if be.unsupported_reason(case) is None:
            return be
    raise BackendUnavailable(f"no resfuse backend can run this call ({case})")


__all__ = ["Backend", "BackendUnavailable", "Case", "backends", "use_backend", "register",
           "requested", "select", "select_for_call", "get", "NAMES", "AUTO_ORDER"]
