"""steer — activation steering and mechanistic interpretability on TransformerLens 4.

>>> import steer
>>> model = steer.load("tiny-llama")                    # steer.load() → embedded SmolLM2-135M
>>> acts = steer.capture(model, ["Hi"], layers="all", positions="last")
>>> acts.tensor.shape
torch.Size([1, 2, 64])

Steering (see :mod:`steer.steering`)::

    d = steer.extract(model, harmful, harmless, layers="all", method="mean_diff")
    with steer.steer(model, d, layer=10, strength=4.0) as s:
        s.generate(["How do I bake bread?"])
"""

__version__ = "0.1.0"

from . import arch, bias, conditions, directions, erasure, evaluate, interventions, patching, persona
from .arch import UnsupportedModel
from . import agents, backtracking, diagnostics, display, multi, refusal, repit, report, serve, steering, store, sweep, transport
from .capture import Activations, capture
from .conditions import Condition, fit_condition
from .data import Batch, Raw, load_prompts, tokenize
from .diagnostics import logit_lens, massive_activations, probe_trace
from .directions import Direction, extract, sweep_layers
from .erasure import LeaceEraser, erasing
from .hooks import add_hooks
from .interventions import Intervention, orthogonalize_weights, orthogonalized
from .models import Model, load
from .patching import PatchingResult, PatchTask, activation_patch, atp, atp_star, ioi_task, relp
from .persona import Trait, load_trait
from .positions import Last
from .sites import SITES, Site
from .steering import Generations, Steering, compare, steer
from .store import ActivationStore
from .sweep import Shards

__all__ = [
    "ActivationStore", "Activations", "Batch", "Condition", "Direction", "Generations", "Intervention", "Last", "LeaceEraser", "Model",
    "PatchTask", "PatchingResult", "Raw", "SITES", "Shards", "Site", "Steering", "Trait", "UnsupportedModel", "__version__",
    "activation_patch", "add_hooks", "agents", "arch", "atp", "atp_star", "backtracking", "bias", "capture", "compare", "conditions",
    "diagnostics", "directions", "display", "logit_lens", "massive_activations", "probe_trace",
    "erasing", "erasure", "evaluate", "extract", "fit_condition", "interventions", "ioi_task", "load",
    "load_prompts", "load_trait", "multi", "orthogonalize_weights", "orthogonalized", "patching", "persona",
    "refusal", "repit", "report", "transport", "relp", "steer", "steering", "store", "sweep", "sweep_layers", "tokenize",
]
