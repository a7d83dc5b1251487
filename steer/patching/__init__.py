"""Localisation by patching: tasks, node sets, activation patching, AtP, AtP*, RelP, diagnostics.

>>> import steer
>>> from steer.patching import ioi_task, activation_patch, atp
>>> m = steer.load("tiny-llama")
>>> task = ioi_task(m, n=4)
>>> exact = activation_patch(m, task, "heads")          # one score per (layer, head)
>>> fast = atp(m, task, "heads")                        # 2 forwards + 1 backward
>>> sorted(exact.correlation(fast))
['pearson', 'spearman']
"""

from .activation import activation_patch, auto_batch_size
from .attribution import atp, atp_star
from .integrated import integrated_gradients
from .diagnostic import missed_effect_bound, topk_recovery_cost
from .nodes import NODE_KINDS, NodeSet, node_set
from .relevance import relevance_rules, relp
from .sharded import over_prompts
from .result import PatchingResult, pearson, spearman
from .subspace import SubspacePatch, subspace_patch
from .tasks import IOI_NAMES, IOI_TEMPLATES, LogitDiff, PatchTask, ioi_task, load_task
from .demo import demo_figure, patch

__all__ = [
    "IOI_NAMES", "IOI_TEMPLATES", "LogitDiff", "NODE_KINDS", "NodeSet", "PatchTask", "PatchingResult",
    "activation_patch", "atp", "atp_star", "integrated_gradients", "auto_batch_size", "demo_figure", "ioi_task", "load_task",
    "missed_effect_bound", "node_set", "over_prompts", "patch", "pearson", "relevance_rules", "relp", "spearman", "subspace_patch", "SubspacePatch",
    "topk_recovery_cost",
]
