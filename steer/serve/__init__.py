"""Steered and conditional generation at serving speed: steer's interventions inside vLLM.

:class:`Engine` (in :mod:`steer.serve.engine`) runs on vLLM's offline engine; the worker half is
:mod:`steer.serve.worker`. vLLM is an optional dependency with its own lock and venv
(``make test-vllm``, ``make serve-demo``): ``import steer.serve`` works without it, ``Engine``
says how to get it.
"""

from .engine import Engine, Served, available, backend_name, engine_for

__all__ = ["Engine", "Served", "available", "backend_name", "engine_for"]
