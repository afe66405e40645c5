"""prefix_grouper: encode a GRPO group's shared prompt once.

Packs a group as ``prefix, suffix_1..suffix_G`` and provides shared-prefix attention
(:func:`prefix_attention`) whose outputs and gradients equal those of the unpacked
``[prefix; suffix_i]`` rows (:mod:`prefix_grouper.unpacked`), plus grouped advantage
kernels (:mod:`prefix_grouper.advantages`) and their broadcast onto tokens.
:class:`PrefixGrouper` is the API of the paper's package (PyPI ``prefix-grouper``) on
these kernels, for code written against it.
"""
import importlib.metadata as _metadata
import warnings as _warnings

from .attention import available_backends, prefix_attention
from .grouper import PrefixGrouper
from .layout import GroupLayout, broadcast_to_padded, broadcast_to_tokens
from .logprobs import fused_linear_log_probs

__all__ = ["GroupLayout", "PrefixGrouper", "available_backends", "broadcast_to_padded", "broadcast_to_tokens",
           "fused_linear_log_probs", "prefix_attention"]
__version__ = "0.1.0"

# Both distributions install the import package prefix_grouper/: with the paper's one also
# installed, either may have overwritten files of the other.
PAPER_DISTRIBUTION = "prefix-grouper"
FIX_MIXED_INSTALL = "pip uninstall -y prefix-grouper && pip install --force-reinstall --no-deps prefix-grouper-kernels"


def _warn_if_paper_package_installed() -> None:
    try:
        paper = _metadata.distribution(PAPER_DISTRIBUTION)
    except _metadata.PackageNotFoundError:
        return
    _warnings.warn(
        f"the paper's package {PAPER_DISTRIBUTION} {paper.version} is installed next to prefix-grouper-kernels: both "
        f"install the import package prefix_grouper, and its files may be mixed with these. Fix: "
        f"{FIX_MIXED_INSTALL} (for an editable checkout, reinstall it with pip install -e . instead of the second "
        f"command)", UserWarning, stacklevel=2)


_warn_if_paper_package_installed()
