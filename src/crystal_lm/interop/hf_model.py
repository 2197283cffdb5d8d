"""Crystal in transformers: `AutoModelForCausalLM.from_pretrained(EXPORT_DIR)` returns our model.

Importing this module registers model type `crystalcoder` with transformers' Auto classes (no remote code).
The transformers class holds our `CrystalModel`'s modules under LLM360's names, so an export (or LLM360's own
checkpoint) loads with no renaming, and its logits are ours. transformers' `DynamicCache` is passed straight
to our attention (same `update` interface); a 2-D attention mask gives per-row positions and key masking, so
left-padded batched generation is correct.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from crystal_lm.interop.llm360 import HF_DEFAULTS, from_hf_config, write_remote_code
from crystal_lm.model.crystal import CrystalModel

# Newer transformers name the output's cache `cache`, older 5.x (5.17, say) `past_key_values`.
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class CrystalCoderConfig(PreTrainedConfig):
    """LLM360's config keys. Shape defaults are Crystal 7B's; an absent muP or rotary key means what it means
    to `crystal import` (llm360.HF_DEFAULTS), so one folder gives one function either way."""

    model_type = "crystalcoder"
    attribute_map = {  # noqa: RUF012 (transformers' class attribute)
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size: int = 32032,
        n_positions: int = HF_DEFAULTS["n_positions"],
        n_embd: int = 4096,
        n_layer: int = 32,
        n_head: int = 32,
        n_inner: int | None = None,  # None: floor(8/3 · n_embd), 10922 for Crystal
        activation_function: str = "swiglu",
        layer_norm_epsilon: float = HF_DEFAULTS["layer_norm_epsilon"],
        position_embedding_type: str = "rotary",
        rotary_dim: int | None = HF_DEFAULTS["rotary_dim"],  # None: a quarter of the head
        rope_theta: float = HF_DEFAULTS["rope_theta"],
        scale_attn_weights: bool = HF_DEFAULTS["scale_attn_weights"],
        mup_scale_qk_dot_by_d: bool = HF_DEFAULTS["mup_scale_qk_dot_by_d"],
        mup_embeddings_scale: float = HF_DEFAULTS["mup_embeddings_scale"],
        mup_output_alpha: float = HF_DEFAULTS["mup_output_alpha"],
        mup_width_scale: float = HF_DEFAULTS["mup_width_scale"],
        attn_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        embd_pdrop: float = 0.0,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size, self.n_positions, self.n_embd = vocab_size, n_positions, n_embd
        self.n_layer, self.n_head, self.n_inner = n_layer, n_head, n_inner
        self.activation_function, self.layer_norm_epsilon = activation_function, layer_norm_epsilon
        self.position_embedding_type, self.rotary_dim, self.rope_theta = (
            position_embedding_type,
            rotary_dim,
            rope_theta,
        )
        self.scale_attn_weights, self.mup_scale_qk_dot_by_d = scale_attn_weights, mup_scale_qk_dot_by_d
        self.mup_embeddings_scale, self.mup_output_alpha = mup_embeddings_scale, mup_output_alpha
        self.mup_width_scale = mup_width_scale
        self.attn_pdrop, self.resid_pdrop, self.embd_pdrop = attn_pdrop, resid_pdrop, embd_pdrop
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", HF_DEFAULTS["tie_word_embeddings"])
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        # An export's auto_map names code files next to its config.json, which a folder saved from this
        # config does not have; the model's save_pretrained writes both again.
        kwargs.pop("auto_map", None)
        super().__init__(**kwargs)


class CrystalCoderLMHeadModel(PreTrainedModel, GenerationMixin):
    config_class = CrystalCoderConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]  # noqa: RUF012

    def __init__(self, config: CrystalCoderConfig) -> None:
        super().__init__(config)
        model_cfg, mup = from_hf_config(config.to_dict(), "CrystalCoderConfig")
        core = CrystalModel(model_cfg, mup)
        self.transformer = core.transformer  # LLM360's names: transformer.wte / h.{i} / ln_f
        if not model_cfg.tie_embeddings:
            self.lm_head = core.lm_head
        object.__setattr__(self, "core", core)  # same modules, not registered twice
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save, plus an export's code files and `auto_map`, so the folder loads with
        trust_remote_code in a process that never imported crystal_lm (as an export does)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        copy = folder / Path(__file__).name  # transformers copies a trust_remote_code class's module: unused
        if copy.is_file() and copy.read_bytes() == Path(__file__).read_bytes():
            copy.unlink()
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = write_remote_code(folder)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint; fresh models use `crystal_lm.model.mup.init_weights`."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.transformer["wte"]

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.transformer["wte"] = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        past_key_values=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        T = input_ids.shape[1]
        mask = None
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            keys = attention_mask.bool()  # [B, past + T]
            S = keys.shape[1]
            causal = torch.ones(T, S, dtype=torch.bool, device=keys.device).tril(diagonal=S - T)
            mask = causal[None] & keys[:, None, :]
            mask[:, torch.arange(T), torch.arange(S - T, S)] = True  # padded rows see themselves (no NaN)
            mask = mask[:, None]
            if position_ids is None:
                position_ids = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        hidden = self.core.hidden_states(
            input_ids, cache if use_cache else None, positions=position_ids, mask=mask
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.core.logits(hidden)
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float()
            loss = F.cross_entropy(
                shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        out = {CACHE_FIELD: cache if use_cache else None}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **out)


def register() -> None:
    AutoConfig.register("crystalcoder", CrystalCoderConfig, exist_ok=True)
    AutoModelForCausalLM.register(CrystalCoderConfig, CrystalCoderLMHeadModel, exist_ok=True)


register()
