"""Integrations with model libraries that bring their own attention dispatch.

`lightning_seqpar.integrations.hf`: Hugging Face transformers (optional extra `hf`). It is
loaded by `load_installed()` only when the library is already imported: a model built from it
can exist only then, and `import lightning_seqpar` stays free of the library's import cost.
"""

from __future__ import annotations

import importlib
import sys

# library module name -> the integration that routes its models through the ring
_INTEGRATIONS = {"transformers": "lightning_seqpar.integrations.hf"}


def load_installed() -> None:
    """Import the integration of every supported library that this process has imported."""
    for library, integration in _INTEGRATIONS.items():
        if library in sys.modules:
            importlib.import_module(integration)
