"""Access to the compiled CUDA extension ``prefix_grouper._C`` (built from csrc/)."""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("prefix_grouper._C"), None
    except ImportError as exc:  # not built (no nvcc / CPU torch / skipped) or ABI mismatch
        return None, str(exc)


def cuda_extension_available() -> bool:
    """True when csrc/ was compiled by ``pip install -e .`` and imports."""
    return _load()[0] is not None


def require_cuda_extension(what: str):
    """The extension module, or a RuntimeError saying why ``what`` cannot use it."""
    module, error = _load()
    if module is None:
        raise RuntimeError(
            f"{what} needs the compiled CUDA extension prefix_grouper._C, which is not available "
            f"({error}). Reinstall with `pip install -e . --no-build-isolation` on a machine with "
            f"nvcc and a CUDA build of torch (and without PREFIX_GROUPER_SKIP_CUDA_BUILD)."
        )
    return module
