"""Hugging Face transformers models under `SeqParStrategy`, with no change to the modeling code.

transformers (4.48+, 5.x) dispatches attention through a registry: an attention layer calls
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, attention_mask, ...)`.
Importing this module registers the implementation `"seqpar"` there, and a swap hook with
`lightning_seqpar.swap`. During `setup` the strategy then finds every `PreTrainedModel` in the
LightningModule and, for the run:

- switches it to `attn_implementation="seqpar"` (restored at teardown), which computes exact
  attention of the local queries over the whole sequence through the active ring;
- turns the 2-D `attention_mask` of the batch (`[B, L_local]`, cut like `input_ids`; 1 = real
  token) into the ring's key padding mask. transformers builds no 4-D mask for an
  implementation it has no mask function for, so the mask reaches the ring as the tokenizer
  made it; causality comes from the attention layer's `is_causal`;
- gives the model the global positions of its local tokens when the call has no
  `position_ids` (zigzag reorders tokens, so `arange(L_local)` would be wrong), and
  `use_cache=False` when the call doesn't choose (a KV cache can't be cut);
- rejects `labels=`: a model's internal loss shifts labels inside each chunk (losing the token
  at every chunk boundary) and averages per chunk. Shift labels on the whole sequence before
  the batch is cut and use `lightning_seqpar.cross_entropy(logits, labels)`;
- rejects what the ring can't compute exactly, naming the model and the feature: logit
  soft-capping, attention sinks, attention dropout, and sliding-window attention over
  sequences longer than the window (up to the window it equals full causal attention, and runs).

`HFCausalLMModule` is a LightningModule around any causal LM of transformers (a tiny Llama built
from `net`, or a checkpoint from `pretrained_path`) for the Hydra main job.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lightning_seqpar.integrations.hf needs transformers>=4.48 (its AttentionInterface): "
        "pip install 'lightning_seqpar[hf]' or pip install -U transformers"
    ) from err

from lightning_seqpar.layout import sequence_positions
from lightning_seqpar.models.gpt import GPTConfig
from lightning_seqpar.models.lm_module import IGNORE_INDEX, CausalLMModule, LMOutput
from lightning_seqpar.swap import active_context
from lightning_seqpar.swap.registry import register_model_hook

__all__ = ["ATTN_IMPLEMENTATION", "HFCausalLMModule", "export_pretrained", "llama_config", "seqpar_attention_forward"]

ATTN_IMPLEMENTATION = "seqpar"

# An attention layer routes through the registry when its forward names it.
_REGISTRY_NAME = "ALL_ATTENTION_FUNCTIONS"
# Config fields of features the ring can't reproduce at any sequence length.
_UNSUPPORTED_FIELDS = {"attn_logit_softcapping": "attention logit soft-capping", "attention_chunk_size": "chunked attention"}

# attention module -> "LlamaForCausalLM" (the model it belongs to), for error messages.
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_name(module: nn.Module) -> str:
    owner = _OWNERS.get(module)
    if owner is not None:
        return f"{owner} ({type(module).__name__})"
    return type(module).__name__


def _unsupported(module: nn.Module, feature: str, advice: str) -> ValueError:
    return ValueError(
        f"{_model_name(module)} uses {feature}, which sequence-parallel ring attention can't compute "
        f"exactly; refusing to train it as plain causal attention. {advice}"
    )


def _check_kwargs(module: nn.Module, kwargs: dict, dropout: float, global_len: int) -> None:
    window = kwargs.get("sliding_window")
    # HF's window: key k is visible to query q when q - window < k <= q. With every distance
    # below the window (global_len <= window) that is full causal attention: exact.
    if window is not None and global_len > window:
        raise _unsupported(
            module, f"sliding-window attention (sliding_window={window}) on sequences of {global_len} tokens",
            "Train on sequences of at most the window, or set config.sliding_window=None "
            "(use_sliding_window=False for Qwen2) if full causal attention is what you want.",
        )
    if kwargs.get("softcap") is not None:
        raise _unsupported(module, f"attention logit soft-capping (softcap={kwargs['softcap']})", "")
    if kwargs.get("s_aux") is not None:
        raise _unsupported(module, "attention sinks (s_aux)", "")
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise ValueError(
            f"{_model_name(module)}: packed sequences (cu_seq_lens_*) can't be cut across ranks; "
            f"pad the sequences of a batch instead"
        )
    if dropout:
        raise _unsupported(
            module, f"attention dropout (attention_dropout={dropout})",
            "Set config.attention_dropout=0.0 (dropout elsewhere in the model is fine).",
        )


def _check_not_packed(module: nn.Module, ring, position_ids, local_len: int) -> None:
    """Without an attention_mask, transformers reads position ids that restart inside a row as
    several packed sequences; the ring attends across them. Positions that are this rank's
    global positions shifted by one constant per row are one sequence (a restart exactly at a
    chunk boundary is not seen here)."""
    if position_ids is None or position_ids.size(-1) != local_len:
        return
    expected = _global_positions(ring, 1, local_len, position_ids.device)
    offset = position_ids - expected
    if bool((offset != offset[..., :1]).any()):
        raise ValueError(
            f"{_model_name(module)}: position_ids restart inside a sequence and there is no attention_mask, "
            f"which transformers treats as packed sequences; sequence parallelism can't keep packed "
            f"sequences apart. Pad the sequences of a batch and pass an attention_mask, or pass the "
            f"global positions (the strategy's injected position_ids)"
        )


def _key_padding_mask(module: nn.Module, attention_mask, batch: int, length: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = getattr(attention_mask, "shape", type(attention_mask).__name__)
        raise ValueError(
            f"{_model_name(module)} under sequence parallelism takes the 2-D attention_mask of the batch "
            f"([B, L_local], 1 = real token), got {tuple(shape) if isinstance(shape, torch.Size) else shape}: "
            f"pass the tokenizer's padding mask, not a prepared 4-D mask"
        )
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"{_model_name(module)}: attention_mask {tuple(attention_mask.shape)} doesn't match the local "
            f"tokens [{batch}, {length}]; the mask must be cut with the batch (same length as input_ids)"
        )
    return attention_mask.bool()


def seqpar_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q `[B, Hq, L_local, D]`, k/v `[B, Hkv, L_local, D]`
    (this rank's chunk), `attention_mask` the batch's 2-D padding mask `[B, L_local]` or None.
    Returns (`[B, L_local, Hq, D]`, None). Outside a sequence-parallel run it is plain local
    attention (causal, padding-masked), so a model left on "seqpar" still works."""
    is_causal = kwargs.pop("is_causal", None)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    batch, _, q_len, _ = query.shape
    k_len = key.size(2)
    ring = active_context()
    if ring is None:
        return _local_attention(query, key, value, attention_mask, causal, scaling, dropout), None
    if k_len != q_len:
        raise ValueError(
            f"{_model_name(module)} under sequence parallelism needs keys cut like the queries, got "
            f"{q_len} queries and {k_len} keys (a KV cache or cross-attention to an uncut sequence)"
        )
    sp_size = dist.get_world_size(ring.group)
    _check_kwargs(module, kwargs, dropout, q_len * sp_size)
    mask = _key_padding_mask(module, attention_mask, batch, k_len)
    if mask is None:
        _check_not_packed(module, ring, kwargs.get("position_ids"), q_len)
    out = ring.attention(query, key, value, causal=causal, scale=scaling, key_padding_mask=mask)
    return out.transpose(1, 2).contiguous(), None


def _local_attention(query, key, value, attention_mask, causal, scaling, dropout) -> torch.Tensor:
    """Single-device attention with the same masks: causal (aligned at the end, as with a KV
    cache) and key padding; a query that sees no real key gets zeros, as in the ring."""
    q_len, k_len = query.size(2), key.size(2)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
    if causal:
        allowed = allowed.tril(diagonal=k_len - q_len)
    allowed = allowed.expand(query.size(0), 1, q_len, k_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, -k_len:]
    if key.size(1) != query.size(1):
        repeat = query.size(1) // key.size(1)
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling)
    out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2).contiguous()


def seqpar_mask(batch_size: int, q_length: int, kv_length: int, attention_mask=None, use_vmap: bool = False, **kwargs):
    """transformers mask function: the ring applies causality over global positions itself, so
    the mask it needs is the 2-D padding mask of the batch, passed through unchanged."""
    if use_vmap:
        # create_causal_mask asks for vmap exactly when the model adds its own mask pattern
        # (e.g. bidirectional blocks of image tokens), which a padding mask would drop.
        raise ValueError(
            "this model adds its own pattern to the causal mask (or_mask_function/and_mask_function, "
            "e.g. bidirectional attention over image tokens), which sequence-parallel ring attention "
            "can't apply; refusing to train it with a plain causal mask"
        )
    return attention_mask


AttentionInterface.register(ATTN_IMPLEMENTATION, seqpar_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, seqpar_mask)


# ----- routing models through the ring (the swap hook) -----------------------------------------


def _routes_through_registry(module: nn.Module) -> bool:
    forward = type(module).forward
    if forward is nn.Module.forward:
        return False
    code = getattr(inspect.unwrap(forward), "__code__", None)
    return code is not None and _REGISTRY_NAME in code.co_names


def _check_config(model: PreTrainedModel) -> None:
    """Features that no sequence length makes exact, found in the config before training."""
    name = type(model).__name__
    for config in _configs(model):
        for field_name, feature in _UNSUPPORTED_FIELDS.items():
            value = getattr(config, field_name, None)
            if value is not None:
                raise ValueError(
                    f"{name} uses {feature} ({field_name}={value}), which "
                    f"sequence-parallel ring attention can't compute exactly; refusing to train it "
                    f"as plain attention"
                )
    for param_name, _ in model.named_parameters():
        if param_name.rsplit(".", 1)[-1] == "sinks":
            raise ValueError(
                f"{name} uses attention sinks ({param_name}), which sequence-parallel ring attention "
                f"can't compute exactly; refusing to train it as plain attention"
            )


def _configs(model: PreTrainedModel):
    seen, stack = set(), [model.config]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen.add(id(config))
        yield config
        stack += [getattr(config, key) for key in getattr(config, "sub_configs", {}) if getattr(config, key, None) is not None]


def _set_implementation(model: PreTrainedModel, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # transformers < 4.51: the config field is the switch
        model.config._attn_implementation = implementation


def _global_positions(ring, batch: int, local_len: int, device) -> torch.Tensor:
    sp_size = dist.get_world_size(ring.group)
    rank = dist.get_rank(ring.group)
    positions = sequence_positions(local_len * sp_size, rank, sp_size, ring.layout, device=device)
    return positions.expand(batch, local_len)


def _guard_call(model: PreTrainedModel, args: tuple, kwargs: dict):
    """Forward pre-hook of every PreTrainedModel during a run (see the module docstring)."""
    ring = active_context()
    if ring is None:
        return None
    signature = inspect.signature(type(model).forward)
    bound = signature.bind_partial(model, *args, **kwargs)
    given = bound.arguments
    extra = given.get(next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), ""), {})
    for name in ("labels", "shift_labels"):
        if given.get(name) is not None or extra.get(name) is not None:
            raise ValueError(
                f"{type(model).__name__}(..., {name}=...) under sequence parallelism: the model's own loss "
                f"shifts labels inside each rank's chunk (losing the token at every chunk boundary) and "
                f"averages per chunk. Shift the labels on the whole sequence before the batch is cut, call "
                f"the model without labels and use lightning_seqpar.cross_entropy(outputs.logits, labels)"
            )
    changed = False
    if "position_ids" in signature.parameters and given.get("position_ids") is None:
        tokens = given.get("input_ids")
        if tokens is None:
            tokens = given.get("inputs_embeds")
        if tokens is not None:
            given["position_ids"] = _global_positions(ring, tokens.size(0), tokens.size(1), tokens.device)
            changed = True
    if "use_cache" in signature.parameters and given.get("use_cache") is None:
        given["use_cache"] = False
        changed = True
    if not changed:
        return None
    return bound.args[1:], bound.kwargs


@dataclass
class ModelRouting:
    """What `route_transformers_models` did to one LightningModule, and how to undo it."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    label: str = f"transformers attn_implementation={ATTN_IMPLEMENTATION!r}"
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def route_transformers_models(root: nn.Module) -> ModelRouting | None:
    """Swap hook: switch every `PreTrainedModel` inside `root` to the ring for the run."""
    models = [(name, m) for name, m in root.named_modules() if isinstance(m, PreTrainedModel)]
    if not models:
        return None
    routing = ModelRouting()
    try:
        _route(root, models, routing)
    except BaseException:
        routing.remove()
        raise
    return routing


def _route(root: nn.Module, models: list, routing: ModelRouting) -> None:
    inner = {id(m) for _, outer in models for _, m in outer.named_modules() if m is not outer}
    for _, model in models:
        _check_config(model)
        if id(model) in inner:
            continue
        # set_attn_implementation also switches the nested models (e.g. LlamaModel inside
        # LlamaForCausalLM); remember every config's choice to restore it at teardown.
        previous = [(config, config._attn_implementation) for _, m in models for config in _configs(m)]
        routing._undo.append(_restorer(model, previous))
        _set_implementation(model, ATTN_IMPLEMENTATION)
    for name, model in models:
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"{type(model).__name__} can't switch its attention implementation (its attention layers "
                f"don't dispatch through transformers' AttentionInterface), so SeqParStrategy can't route "
                f"it through the ring; without that each rank would attend only inside its chunk"
            )
        handle = model.register_forward_pre_hook(_guard_call, with_kwargs=True)
        routing._undo.append(handle.remove)
    outer = [(prefix, m) for prefix, m in models if id(m) not in inner]
    for name, module in root.named_modules():
        owner = next((m for prefix, m in outer if prefix == "" or name.startswith(prefix + ".")), None)
        if owner is not None and _routes_through_registry(module):
            routing.modules[name] = module
            _OWNERS[module] = type(owner).__name__


def _restorer(model: PreTrainedModel, previous: list) -> Callable[[], None]:
    def restore() -> None:
        original = next(impl for config, impl in previous if config is model.config)
        _set_implementation(model, original)
        for config, implementation in previous:  # nested configs a warning path may have skipped
            if config._attn_implementation != implementation:
                config._attn_implementation = implementation
    return restore


register_model_hook(route_transformers_models)


# ----- the LightningModule --------------------------------------------------------------------

# The project's architecture fields (as in `model=tiny`) -> LlamaConfig's.
_LLAMA_FIELDS = {
    "vocab_size": "vocab_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads", "d_model": "hidden_size", "mlp_hidden": "intermediate_size",
    "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings", "init_std": "initializer_range",
}


def llama_config(net: GPTConfig, **hf_config: Any) -> transformers.LlamaConfig:
    """A `LlamaConfig` with the shape of `net`; `hf_config` sets any other LlamaConfig field."""
    fields = {hf: getattr(net, ours) for ours, hf in _LLAMA_FIELDS.items()}
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": net.rope_theta}
    fields.setdefault("max_position_embeddings", 131072)
    fields.update(hf_config)
    return transformers.LlamaConfig(**fields)


class HFCausalLMModule(CausalLMModule):
    """`CausalLMModule` (same loss, metrics, optimizer and schedule) around a transformers
    causal LM, `self.model`.

    Args:
        net: the architecture in the fields of `model=tiny` (`GPTConfig`: vocab_size, n_layer,
            n_head, n_kv_head, d_model, mlp_hidden, rope_theta, ...), built as a
            `LlamaForCausalLM` from scratch. Ignored with `pretrained_path`.
        hf_config: other `LlamaConfig` fields, by transformers' names; with a `model_type`
            key (e.g. "qwen2", "mistral") the whole config of that family instead, and `net` is
            ignored. With `pretrained_path`: keyword arguments of `from_pretrained`.
        pretrained_path: a local checkpoint directory (or hub id) for
            `AutoModelForCausalLM.from_pretrained`; any causal-LM family whose attention uses
            transformers' AttentionInterface.
        dtype: the parameters' dtype for `pretrained_path` (default float32; mixed precision
            comes from the Trainer's `precision`).
        Other args as `CausalLMModule`.

    `config` is the `GPTConfig` of `net` (None otherwise); the model's own
    config is `self.model.config`. Batches: `input_ids`, `labels` (shifted on the whole
    sequence), optionally `attention_mask` and `position_ids`. `save_pretrained(path)` writes a
    transformers checkpoint; `lightning_seqpar.integrations.hf.export_pretrained` turns a
    Lightning checkpoint into one.
    """

    def __init__(
        self,
        net: dict[str, Any] | None = None,
        hf_config: dict[str, Any] | None = None,
        pretrained_path: str | None = None,
        dtype: str = "float32",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ):
        # CausalLMModule.__init__ would build its GPT; the shared parts are set up here instead.
        super(CausalLMModule, self).__init__()
        self.save_hyperparameters()
        if pretrained_path:
            self.config = None
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                pretrained_path, dtype=getattr(torch, dtype), **dict(hf_config or {})
            )
        elif hf_config and "model_type" in hf_config:
            self.config = None
            fields = dict(hf_config)
            config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
            self.model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            self.config = GPTConfig(**dict(net or {}))
            self.model = transformers.LlamaForCausalLM(llama_config(self.config, **dict(hf_config or {})))
        self._init_metrics(self.model.config.vocab_size)

    def _init_metrics(self, vocab_size: int) -> None:
        from torchmetrics import SumMetric
        from torchmetrics.classification import MulticlassAccuracy

        self.val_nll_sum = SumMetric()
        self.val_tokens = SumMetric()
        self.val_acc = MulticlassAccuracy(num_classes=vocab_size, average="micro", ignore_index=IGNORE_INDEX)
        self._loss_fn = None

    def forward(self, input_ids, position_ids=None, labels=None, attention_mask=None) -> LMOutput:
        logits = self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).logits
        return LMOutput(None if labels is None else self.loss(logits, labels), logits)

    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        """Write the model as a transformers checkpoint (`from_pretrained` loads it)."""
        self.model.save_pretrained(path, **kwargs)


def export_pretrained(checkpoint_path: str, path: str, **kwargs: Any) -> HFCausalLMModule:
    """Turn a Lightning checkpoint of `HFCausalLMModule` (saved under any strategy: the state
    dict keys are the model's own, under `model.`) into a transformers checkpoint directory."""
    module = HFCausalLMModule.load_from_checkpoint(checkpoint_path, map_location="cpu")
    module.save_pretrained(path, **kwargs)
    return module
