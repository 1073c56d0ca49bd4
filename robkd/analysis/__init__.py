"""Analysis quantities: local linearity (LLM), Proposition-2 terms, evaluation sanity checks.

Submodules are imported lazily so that ``import robkd.analysis`` stays cheap:
``robkd.analysis.llm`` (:func:`local_linearity`, :func:`local_linearity_report`),
``robkd.analysis.prop2`` (:func:`prop2_terms`, :class:`Prop2Result`) and
``robkd.analysis.sanity`` (evaluation sanity checks).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "local_linearity": "robkd.analysis.llm",
    "local_linearity_report": "robkd.analysis.llm",
    "prop2_terms": "robkd.analysis.prop2",
    "Prop2Result": "robkd.analysis.prop2",
    "attack_self_test": "robkd.analysis.selftest",
    "corrupt": "robkd.analysis.corruptions",
    "corruption_accuracy": "robkd.analysis.corruptions.accuracy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robkd.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
