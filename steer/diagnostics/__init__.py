"""Diagnostics a researcher reaches for before steering or patching (``METHODS.md`` §5).

* :mod:`~steer.diagnostics.massive`: massive activations and the attention they draw;
* :mod:`~steer.diagnostics.lens`: logit lens (early decoding), plain or steered;
* :mod:`~steer.diagnostics.traces`: a probe read at every token of prompt and generation;
* :mod:`~steer.diagnostics.heads`: the heads that move a trace, ranked by attribution and
  verified by ablation;
* :mod:`~steer.diagnostics.compare`: two models of one architecture (direction cosines,
  direction transfer, cross-model patching by layer);
* :mod:`~steer.diagnostics.trajectories`: prompts' paths through the layers by task and outcome,
  and steering toward a task's non-refusal trajectory.
"""

from .compare import CrossPatch, Transfer, cross_patch, direction_cosines, transfer
from .heads import TraceHeads, trace_heads
from .lens import LogitLens, logit_lens
from .massive import MassiveActivations, massive_activations
from .traces import ProbeTrace, probe_trace
from .trajectories import Trajectories, trajectories

__all__ = ["massive_activations", "MassiveActivations", "logit_lens", "LogitLens", "probe_trace", "ProbeTrace",
           "trace_heads", "TraceHeads",
           "direction_cosines", "transfer", "Transfer", "cross_patch", "CrossPatch",
           "trajectories", "Trajectories"]
