"""Loading the optional CUDA extension `resfuse._C`, and saying why it is not there.

`load_extension()` returns `(module, "loaded")` or `(None, reason)` and never raises. The
reason draws on the build record `resfuse/_build_info.py` (written by setup.py at every build,
git-ignored):
  - skipped at build time:   "not built: torch 2.13.0+cpu is a CPU-only build"
  - never built here:        "not built: no build record (install with `pip install ...`)"
  - built but does not load: names the torch it was built against, the torch found, and the
                             import error (typically an ABI mismatch after a torch change).
The result is cached; `load_extension.cache_clear()` forgets it.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional, Tuple

INSTALL_HINT = "pip install --no-build-isolation -e ."


def build_info() -> Optional[dict]:
    """The build record written by setup.py, or None when there is none (or it is unreadable)."""
    try:
        mod = importlib.import_module("resfuse._build_info")
        info = getattr(mod, "BUILD_INFO", None)
        return dict(info) if isinstance(info, dict) else None
    except Exception:  # noqa: BLE001 - never raise from here
        return None


def _torch_found() -> str:
    try:
        import torch

        return str(torch.__version__)
    except Exception as e:  # noqa: BLE001
        return f"none importable ({type(e).__name__}: {e})"


def _missing_reason(info: Optional[dict]) -> str:
    if info is None:
        return f"not built: no build record, the package was never built here (install with `{INSTALL_HINT}`)"
    if not info.get("cuda_extension"):
        reason = info.get("reason") or "skipped at build time"
        return reason if reason.startswith("not built") else f"not built: {reason}"
    return (f"missing: the build record says resfuse._C was built against torch "
            f"{info.get('torch')} at {info.get('built_at')}, but no resfuse/_C*.so is found "
            f"(rebuild with `{INSTALL_HINT}`)")


def _load_failed_reason(info: Optional[dict], error: BaseException) -> str:
    built = (info or {}).get("torch") or "unknown (no build record)"
    built_cuda = (info or {}).get("torch_cuda")
    if built_cuda:
        built += f" (CUDA {built_cuda})"
    return (f"does not load: built against torch {built}, found torch {_torch_found()} "
            f"(rebuild with `{INSTALL_HINT}`): {type(error).__name__}: {error}")


@functools.lru_cache(maxsize=None)
def load_extension() -> Tuple[Optional[object], str]:
    """(resfuse._C, "loaded") or (None, why not). Never raises; cached."""
    info = build_info()
    try:
        module = importlib.import_module("resfuse._C")
    except ModuleNotFoundError as e:
        if e.name in ("resfuse._C", None):
            return None, _missing_reason(info)
        return None, _load_failed_reason(info, e)  # a dependency of _C is missing
    except Exception as e:  # noqa: BLE001 - ImportError (undefined symbol: ABI mismatch), OSError, ...
        return None, _load_failed_reason(info, e)
    return module, "loaded"
