"""Loading the optional CUDA extension `resfuse._C`, and saying why it is not there.

Never raises: `load_extension()` returns (module, None) or (None, reason), where the reason
names what the build recorded (resfuse/_build_info.py, written by setup.py) and, for an
extension that exists but does not load (built against another torch), the torch it was built
against and the one found.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional, Tuple

import torch


def build_info() -> Optional[dict]:
    try:
        from ._build_info import BUILD_INFO
        return BUILD_INFO
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def load_extension() -> Tuple[Optional[object], Optional[str]]:
    info = build_info()
    try:
        return importlib.import_module("resfuse._C"), None
    except ModuleNotFoundError:
        if info is None:
            return None, "not built: no build record (install with `pip install --no-build-isolation -e .`)"
        if not info.get("cuda_extension"):
            return None, info.get("reason") or "not built"
        return None, "built but missing: resfuse/_C*.so is not on the path (reinstall)"
    except ImportError as e:
        built = (info or {}).get("torch", "unknown")
        return None, (f"does not load: built against torch {built}, found torch "
                      f"{torch.__version__} (rebuild with `pip install --no-build-isolation -e .`): {e}")
