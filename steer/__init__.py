"""steer — activation steering and mechanistic interpretability on TransformerLens 4.

>>> import steer
>>> model = steer.load("tiny-llama")                    # steer.load() → embedded SmolLM2-135M
>>> acts = steer.capture(model, ["Hi"], layers="all", positions="last")
>>> acts.tensor.shape
torch.Size([1, 2, 64])
"""

__version__ = "0.1.0"

from .capture import Activations, capture
from .data import Batch, Raw, load_prompts, tokenize
from .hooks import add_hooks
from .models import Model, load
from .positions import Last
from .sites import SITES, Site

__all__ = [
    "Activations", "Batch", "Last", "Model", "Raw", "SITES", "Site", "__version__",
    "add_hooks", "capture", "load", "load_prompts", "tokenize",
]
