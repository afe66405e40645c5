"""prefix_grouper: encode a GRPO group's shared prompt once.

Packs a group as ``prefix, suffix_1..suffix_G`` and provides shared-prefix attention
(:func:`prefix_attention`) whose outputs and gradients equal those of the unpacked
``[prefix; suffix_i]`` rows (:mod:`prefix_grouper.unpacked`), plus grouped advantage
kernels (:mod:`prefix_grouper.advantages`) and their broadcast onto tokens.
:class:`PrefixGrouper` is the API of the paper's package (PyPI ``prefix-grouper``) on
these kernels, for code written against it.

The names below load on first use (PEP 562), so that ``import prefix_grouper`` (and the
command lines' ``--help``) does not import torch.
"""
import importlib as _importlib
import importlib.metadata as _metadata
import os as _os
import warnings as _warnings

__version__ = "0.1.0"
_EXPORTS = {"GroupLayout": "layout", "broadcast_to_padded": "layout", "broadcast_to_tokens": "layout",
            "PrefixGrouper": "grouper", "available_backends": "attention", "prefix_attention": "attention",
            "fused_linear_log_probs": "logprobs"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """An exported name, or a submodule (``prefix_grouper.attention`` after a bare
    ``import prefix_grouper``, as when everything was imported eagerly), on first use."""
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise  # the submodule exists and itself failed to import
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# The paper's distribution (PyPI prefix-grouper) installs the same import package,
# prefix_grouper/. Installed next to this one (prefix-grouper-kernels, not on PyPI), either
# overwrites files of the other in site-packages, or, beside an editable install, is what
# `import prefix_grouper` finds everywhere but in the checkout.
PAPER_DISTRIBUTION = "prefix-grouper"
# Files that only the paper's package puts under prefix_grouper/ (its 0.0.1.post1 RECORD).
PAPER_ONLY_FILES = ("function.py", "info.py", "__version__.py", _os.path.join("utils", "mask.py"),
                    _os.path.join("utils", "typing.py"))


def _checkout() -> str | None:
    """The source checkout this package was imported from (an editable install or a run
    from the checkout), or None for a copy installed into site-packages."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    try:
        with open(_os.path.join(root, "pyproject.toml"), encoding="utf-8") as f:
            return root if 'name = "prefix-grouper-kernels"' in f.read() else None
    except OSError:
        return None


def fix_mixed_install_command() -> str:
    """The shell command that leaves only this distribution installed: both uninstalled
    (removing the paper's files also removes files of ours it had overwritten), then this
    one reinstalled from its checkout. ``--no-build-isolation`` builds the CUDA extension
    against the installed torch; it needs setuptools >= 77 in the environment."""
    checkout = _checkout() or "<your prefix-grouper-kernels checkout>"
    return (f"pip uninstall -y {PAPER_DISTRIBUTION} prefix-grouper-kernels && pip install 'setuptools>=77' && "
            f"pip install --no-build-isolation -e {checkout}")


def _paper_package_evidence() -> str | None:
    """Where the paper's package shows, or None: its files beside this ``__init__``, or its
    metadata (dist-info with RECORD) anywhere on ``sys.path``."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    mixed = [name for name in PAPER_ONLY_FILES if _os.path.exists(_os.path.join(here, name))]
    if mixed:
        return f"{here} holds files of both packages (the paper's {', '.join(mixed)})"
    try:
        paper = _metadata.distribution(PAPER_DISTRIBUTION)
    except _metadata.PackageNotFoundError:
        return None
    where = f" in {paper.locate_file('')}" if hasattr(paper, "locate_file") else ""
    return f"the paper's package {PAPER_DISTRIBUTION} {paper.version} is installed{where}"


def _warn_if_paper_package_installed() -> None:
    evidence = _paper_package_evidence()
    if evidence is None:
        return
    _warnings.warn(
        f"{evidence}. It shares the import name prefix_grouper with prefix-grouper-kernels (this package, loaded "
        f"from {_os.path.dirname(_os.path.abspath(__file__))}): depending on the working directory and the install "
        f"order, `import prefix_grouper` loads one, the other, or a mix of both. Fix: {fix_mixed_install_command()}",
        UserWarning, stacklevel=2)


_warn_if_paper_package_installed()
