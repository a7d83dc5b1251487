"""A model's anatomy: one declarative entry per family. The only module that names HF submodules.

Every other part of steer asks this module where things are: the decoder blocks, a block's
attention and MLP, the norms around them, the projections that make queries, keys and values
(separate, or one fused matrix), the matrices that write into the residual stream, the
embeddings and the unembedding, and how positions are encoded. Adding a family is one
:class:`Arch` entry in :data:`FAMILIES` plus its tiny model in the test matrix.

>>> import steer
>>> a = of(steer.load("tiny-llama").hf)
>>> a.family, a.attn, a.qkv
('llama', 'self_attn', None)
>>> of(steer.load("tiny-gpt2").hf).qkv_layout
'concat'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Arch", "FAMILIES", "of", "UnsupportedModel", "supported"]


class UnsupportedModel(NotImplementedError):
    """steer does not know (or cannot do this with) a model's architecture."""


@dataclass(frozen=True)
class Arch:
    """Where a family keeps its parts (attribute paths, dotted, relative to the named parent).

    The token embedding and the unembedding are HF's own ``get_input_embeddings()`` /
    ``get_output_embeddings()``. ``base`` is the CausalLM's base model, ``layers`` its block list; block parts are relative to
    a block, projections relative to the attention or MLP module. ``attn_post_norm`` /
    ``mlp_post_norm`` name norms applied to a sublayer's *output* before the residual add
    (Gemma-2/3 sandwich norms, OLMo-2 post-norms): steer's ``attn_out``/``mlp_out`` are their
    outputs, what the residual stream receives. ``qkv`` names a fused projection whose output is
    ``[q | k | v]`` (``"concat"``, Phi-3 and GPT-2) or ``[head, (q, k, v), d_head]``
    (``"per_head"``, GPT-NeoX). ``conv1d``: GPT-2's ``Conv1D`` stores weights ``[in, out]``.
    ``parallel``: attention and MLP both read the block input (no ``resid_mid``).
    ``runner``: the layer-by-layer patching runner can re-run this family's blocks.
    """

    family: str
    model_types: tuple[str, ...]
    base: str = "model"
    layers: str = "layers"
    pos_embed: Optional[str] = None
    final_norm: str = "norm"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: Optional[str] = "input_layernorm"
    mlp_norm: Optional[str] = "post_attention_layernorm"
    attn_post_norm: Optional[str] = None
    mlp_post_norm: Optional[str] = None
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: Optional[str] = None
    qkv_layout: Optional[str] = None
    o: str = "o_proj"
    mlp_out: Optional[str] = "down_proj"
    gated_mlp: Optional[tuple[str, str, str]] = ("gate_proj", "up_proj", "act_fn")
    conv1d: bool = False
    parallel: bool = False
    rotary: Optional[str] = "rotary_emb"  # on the base model; None: positions are in the embeddings
    qk_norm_scope: str = "per_head"  # q_norm/k_norm (where present) normalise each head, or the whole projection
    runner: bool = True
    notes: tuple[str, ...] = field(default=())

    # -- lookups on live modules ----------------------------------------------------------
    def base_model(self, hf: torch.nn.Module) -> torch.nn.Module:
        return _get(hf, self.base)

    def blocks(self, hf: torch.nn.Module) -> torch.nn.ModuleList:
        return _get(self.base_model(hf), self.layers)

    def part(self, block: torch.nn.Module, name: Optional[str]) -> Optional[torch.nn.Module]:
        """A block's submodule by role attribute (``"attn"``, ``"mlp_norm"``, ...); None if absent."""
        path = getattr(self, name)
        return None if path is None else _get(block, path, None)

    def attention(self, block) -> torch.nn.Module:
        return _get(block, self.attn)

    def mlp_module(self, block) -> torch.nn.Module:
        return _get(block, self.mlp)

    def proj(self, block, which: str) -> Optional[torch.nn.Module]:
        """The ``"q"``/``"k"``/``"v"``/``"o"``/``"qkv"`` projection of a block's attention."""
        path = getattr(self, which)
        return None if path is None else _get(self.attention(block), path, None)

    def mlp_out_proj(self, block) -> Optional[torch.nn.Module]:
        """The MLP's output projection (its input is the ``neuron`` site); None for MoE blocks."""
        return None if self.mlp_out is None else _get(self.mlp_module(block), self.mlp_out)

    def read_matrix(self, block, which: str) -> Tensor:
        """The matrix that reads a site into the residual stream, as ``[d_model, d_in]``:
        ``"o"`` (``W_O``, reading the heads' ``z``, head-major) or ``"mlp"`` (``W_out``, reading
        the ``neuron`` site). GPT-2's ``Conv1D`` stores it transposed."""
        mod = self.proj(block, "o") if which == "o" else self.mlp_out_proj(block)
        if mod is None:
            raise UnsupportedModel(f"{self.family} blocks have no single {which!r} output matrix (MoE MLPs route tokens).")
        return mod.weight.detach().T if self.conv1d else mod.weight.detach()

    def writers(self, block) -> list[Optional[torch.nn.Module]]:
        """The modules of a block whose outputs are added to the residual stream."""
        return [self.proj(block, "o"), self.mlp_out_proj(block)]

    def final_norm_of(self, hf: torch.nn.Module) -> torch.nn.Module:
        return _get(self.base_model(hf), self.final_norm)

    def pos_embedding(self, hf: torch.nn.Module) -> Optional[torch.nn.Module]:
        """Learned absolute position embeddings (GPT-2's ``wpe``); None for rotary models."""
        return None if self.pos_embed is None else _get(self.base_model(hf), self.pos_embed)

    def rotary_of(self, hf: torch.nn.Module) -> Optional[torch.nn.Module]:
        return None if self.rotary is None else _get(self.base_model(hf), self.rotary, None)


def _get(obj, path: str, default=...):
    for name in path.split("."):
        if not hasattr(obj, name):
            if default is not ...:
                return default
            raise UnsupportedModel(f"{type(obj).__name__} has no {name!r} (looking up {path!r}).")
        obj = getattr(obj, name)
    return obj


FAMILIES: tuple[Arch, ...] = (
    Arch("llama", ("llama", "mistral", "qwen2", "qwen3")),
    Arch("qwen3_moe", ("qwen3_moe",), mlp_out=None, gated_mlp=None,
         notes=("MoE: the MLP is a router over experts, so there is no single neuron site",)),
    Arch("olmo2", ("olmo2",), attn_norm=None, mlp_norm=None, attn_post_norm="post_attention_layernorm",
         mlp_post_norm="post_feedforward_layernorm", qk_norm_scope="full",
         notes=("q/k norms span all heads, so patching one head's q moves every head: no QK fix",)),
    Arch("gemma", ("gemma",)),
    Arch("gemma2", ("gemma2", "gemma3_text"), mlp_norm="pre_feedforward_layernorm",
         attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm",
         notes=("sandwich norms: attn_out/mlp_out are the normed sublayer outputs",)),
    Arch("phi3", ("phi3",), qkv="qkv_proj", qkv_layout="concat", gated_mlp=None,
         notes=("fused qkv_proj and gate_up_proj",)),
    Arch("gpt2", ("gpt2",), base="transformer", layers="h", pos_embed="wpe", final_norm="ln_f",
         attn="attn", attn_norm="ln_1", mlp_norm="ln_2", qkv="c_attn", qkv_layout="concat", o="c_proj",
         mlp_out="c_proj", gated_mlp=None, conv1d=True, rotary=None,
         notes=("Conv1D weights, learned absolute positions",)),
    Arch("gpt_neox", ("gpt_neox",), base="gpt_neox", final_norm="final_layer_norm", attn="attention", qkv="query_key_value", qkv_layout="per_head", o="dense",
         mlp_out="dense_4h_to_h", gated_mlp=None,
         notes=("parallel attention + MLP (no resid_mid), partial rotary",)),
)
_BY_TYPE = {t: a for a in FAMILIES for t in a.model_types}


def supported() -> list[str]:
    """Model types steer knows (``config.model_type``).

    >>> "gpt2" in supported(), "bloom" in supported()
    (True, False)
    """
    return sorted(_BY_TYPE)


def of(hf: torch.nn.Module) -> Arch:
    """The :class:`Arch` of a HF ``*ForCausalLM``, checked against its modules.

    Raises :class:`UnsupportedModel` naming the model type and the families steer knows.

    >>> import steer
    >>> a = of(steer.load("tiny-pythia").hf)
    >>> a.family, a.parallel, a.proj(a.blocks(steer.load("tiny-pythia").hf)[0], "qkv").out_features
    ('gpt_neox', True, 192)
    """
    cfg = hf.config
    mt = getattr(cfg, "model_type", None)
    a = _BY_TYPE.get(mt)
    if a is None:
        raise UnsupportedModel(
            f"steer does not know the anatomy of model_type={mt!r} ({type(hf).__name__}). Known: "
            f"{', '.join(supported())}. Adding a family is one entry in steer/arch.py."
        )
    if a.family == "gpt_neox":  # Pythia: parallel attention + MLP unless the config says otherwise
        a = _replace(a, parallel=bool(getattr(cfg, "use_parallel_residual", True)))
    try:
        block = a.blocks(hf)[0]
        for role in ("attn", "mlp"):
            _get(block, getattr(a, role))
        if a.qkv is None:
            for w in ("q", "k", "v"):
                _get(a.attention(block), getattr(a, w))
        else:
            _get(a.attention(block), a.qkv)
        _get(a.attention(block), a.o)
        a.final_norm_of(hf)
    except UnsupportedModel as e:
        raise UnsupportedModel(f"{type(hf).__name__} (model_type={mt!r}) does not look like steer's "
                               f"{a.family!r} family: {e}") from None
    return a


def _replace(a: Arch, **kw) -> Arch:
    from dataclasses import replace

    return replace(a, **kw)


# -- fused projections ----------------------------------------------------------------------
def qkv_slices(a: Arch, n_heads: int, n_kv_heads: int, d_head: int):
    """For a fused projection: ``{"q"|"k"|"v": (read, write)}`` where ``read(out)`` gives the
    ``[batch, pos, heads, d_head]`` part of the fused output and ``write(out, new)`` puts it back.

    >>> out = torch.arange(12.).view(1, 1, 12)            # 2 heads x (q, k, v) x d_head 2, per head
    >>> read, write = qkv_slices(FAMILIES[-1], 2, 2, 2)["k"]
    >>> read(out).tolist()
    [[[[2.0, 3.0], [8.0, 9.0]]]]
    >>> write(out, torch.zeros(1, 1, 2, 2))[0, 0].tolist()[:6]
    [0.0, 1.0, 0.0, 0.0, 4.0, 5.0]
    """
    if a.qkv_layout == "concat":
        sizes = {"q": n_heads * d_head, "k": n_kv_heads * d_head, "v": n_kv_heads * d_head}
        starts = {"q": 0, "k": sizes["q"], "v": sizes["q"] + sizes["k"]}
        heads = {"q": n_heads, "k": n_kv_heads, "v": n_kv_heads}

        def pair(w):
            s, e = starts[w], starts[w] + sizes[w]

            def read(out: Tensor) -> Tensor:
                return out[..., s:e].unflatten(-1, (heads[w], d_head))

            def write(out: Tensor, new: Tensor) -> Tensor:
                return torch.cat((out[..., :s], new.flatten(-2), out[..., e:]), -1)

            return read, write

        return {w: pair(w) for w in "qkv"}
    if a.qkv_layout == "per_head":  # [..., head, 3 * d_head], each head's q, k, v in turn
        def pair(i):
            def read(out: Tensor) -> Tensor:
                return out.unflatten(-1, (n_heads, 3 * d_head))[..., i * d_head:(i + 1) * d_head]

            def write(out: Tensor, new: Tensor) -> Tensor:
                x = out.unflatten(-1, (n_heads, 3, d_head)).clone()
                x[..., i, :] = new
                return x.flatten(-3)

            return read, write

        return {w: pair(i) for i, w in enumerate("qkv")}
    raise UnsupportedModel(f"Unknown fused q/k/v layout {a.qkv_layout!r}.")


def dims(cfg) -> dict:
    """``n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, d_vocab`` from a HF config.

    >>> from transformers import GPT2Config
    >>> dims(GPT2Config(n_embd=64, n_layer=2, n_head=4))["d_mlp"]     # GPT-2: 4 x d_model
    256
    """
    d = cfg.hidden_size
    h = cfg.num_attention_heads
    d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
    return dict(n_layers=cfg.num_hidden_layers, d_model=d, n_heads=h,
                n_kv_heads=getattr(cfg, "num_key_value_heads", None) or h,
                d_head=getattr(cfg, "head_dim", None) or d // h, d_mlp=d_mlp, d_vocab=cfg.vocab_size)


def support_table() -> str:
    """What steer does on each family, as the markdown table in the README (a test keeps the
    README equal to this; every family has a tiny model in ``tests/test_architectures.py``).

    >>> support_table().splitlines()[0].startswith("| family")
    True
    """
    yes, no = "yes", "—"
    rows = ["| family | model_type | capture, steering | resid_mid / neuron | activation patching, AtP, AtP* | "
            "QK fix | RelP | weight orthogonalization | notes |", "|" + "---|" * 9]
    for a in FAMILIES:
        post = a.attn_post_norm or a.mlp_post_norm
        rows.append(
            f"| {a.family} | {', '.join(a.model_types)} | {yes} | "
            f"{no if a.family == 'gpt_neox' else yes} / {no if a.mlp_out is None else yes} | "  # Pythia: parallel
            f"{yes if a.runner else no} | {yes if a.runner and a.qk_norm_scope == 'per_head' else no} | "
            f"{yes if a.runner and a.gated_mlp else no} | {no if post or a.mlp_out is None else yes} | "
            f"{'; '.join(a.notes)} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(support_table())
