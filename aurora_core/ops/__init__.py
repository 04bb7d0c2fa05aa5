"""Public ops. Each op lives in its own module (``aurora_core.ops.preprocess``) and dispatches through
``aurora_core._dispatch``; the package does not re-export them, so that ``aurora_core.ops.preprocess``
stays the module (``aurora_core.preprocess`` is the function)."""
