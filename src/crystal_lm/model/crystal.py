"""The Crystal transformer (crystal-spec §1), written to read like the spec.

Pre-LN blocks with LayerNorm (with bias), biases on q/k/v/out/up/gate/down, GPT-J "interleaved" rotary on the
first 25% of each head's dims, SwiGLU `up ⊙ SiLU(gate)`, tied embeddings, no dropout, plain causal attention
over the whole packed window. The muP pieces of the forward pass (×α_in on embeddings, ×α_out/m_d on logits,
q·kᵀ/d_head) live here too because they are part of the function the model computes; initialisation and
per-group learning rates are in `crystal_lm.model.mup`. The model knows nothing of parallelism.

Parameter names and layouts are LLM360's own (GPT-2 style: `transformer.h.{i}.attn.c_attn` with q|k|v fused,
weights stored [in, out]), so a checkpoint of ours is a checkpoint in their layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crystal_lm.config import ModelConfig, MupConfig
from crystal_lm.model.loss import linear_cross_entropy


class KVCache:
    """Keys and values of past positions per layer; the interface of transformers' `DynamicCache`
    (`update`, `get_seq_length`), so either can be passed to the model."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.layers):
            self.layers.append((k, v))
        else:
            pk, pv = self.layers[layer_idx]
            self.layers[layer_idx] = (torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2))
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx][0].shape[2] if len(self.layers) > layer_idx else 0


class Conv1D(nn.Module):
    """A linear layer whose weight is stored [in, out], as in GPT-2 and LLM360's checkpoints."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One addmm, as GPT-2's Conv1D: under bf16 autocast the bias is cast too and the output stays bf16
        # (`x @ w + b` would promote every projection's output, and what backward saves, to fp32).
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], out.shape[-1])


def rotary_tables(
    rotary_dim: int, positions: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [..., T, rotary_dim/2] for positions [..., T] (fp32)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=positions.device) / rotary_dim
    angles = positions.float()[..., None] * (1.0 / theta**exponents)
    return angles.cos(), angles.sin()


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J rotary on the first `2*cos.shape[-1]` dims of each head: rotate pairs (0,1), (2,3), ...

    x: [B, H, T, D]; cos/sin: [T, R/2] or [B, 1, T, R/2]. Dims past the rotary part pass through unchanged.
    """
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    even, odd = x_rot[..., 0::2].float(), x_rot[..., 1::2].float()
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim, self.rotary_dim = cfg.n_heads, cfg.head_dim, cfg.rotary_dim
        self.theta = cfg.rope_theta
        self.scale = 1.0 / self.head_dim if cfg.qk_scale == "d_head" else self.head_dim**-0.5
        self.c_attn = Conv1D(cfg.d_model, 3 * cfg.d_model)  # [q | k | v]
        self.c_proj = Conv1D(cfg.d_model, cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(C, dim=-1)
        )
        if self.rotary_dim:
            q, k = apply_interleaved_rotary(q, *rope), apply_interleaved_rotary(k, *rope)
            # Attention's backward keeps v; as a view it would keep the whole q|k|v output alive (3x).
            v = v.contiguous()
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # muP: scores are q·kᵀ / d_head, not / sqrt(d_head).
        if mask is None and (k.shape[2] == T or T == 1):  # plain causal, or one new token seeing all
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale)
        else:
            if mask is None:  # a cached prefix makes the causal mask rectangular
                past = k.shape[2] - T
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class SwiGLU(nn.Module):
    """out = down(up(x) ⊙ SiLU(gate(x))) with up = c_fc, gate = c_fc2, down = c_proj (LLM360's names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.d_model, cfg.ffn_dim)
        self.c_fc2 = Conv1D(cfg.d_model, cfg.ffn_dim)
        self.c_proj = Conv1D(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.c_fc(x) * F.silu(self.c_fc2(x)))


class LayerNorm(nn.LayerNorm):
    """LayerNorm in its input's precision, whatever precision its weights are held in: the residual stream
    stays fp32 when a block's weights are bf16 (FSDP2 gathering them in bf16), as it does under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps
        )


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ln_2 = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope, cache=None, mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


class CrystalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, mup: MupConfig) -> None:
        super().__init__()
        self.cfg, self.mup = cfg, mup
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.d_model),
                "h": nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers)),
                "ln_f": nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps),
            }
        )
        if not cfg.tie_embeddings:  # standard-parametrisation exports (folded muP), or a recipe's choice
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # muP multipliers: α_in on embeddings; α_out / m_d on logits (tied head, no bias).
        self.embeddings_scale = mup.embeddings_scale
        self.logits_scale = mup.output_alpha * mup.base_width / cfg.d_model

    @property
    def width_multiplier(self) -> float:
        return self.cfg.d_model / self.mup.base_width

    @property
    def wte(self) -> nn.Embedding:
        return self.transformer["wte"]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer["h"]

    def hidden_states(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states; `cache` (if given) is extended in place. `positions` ([T] or per row
        [B, T]) default to the cache length onwards; `mask` (bool, broadcastable to [B, 1, T, past+T],
        True = attend) replaces the causal mask."""
        if positions is None:
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)
        cos, sin = rotary_tables(self.cfg.rotary_dim, positions, self.cfg.rope_theta)
        if cos.ndim == 3:  # per-row positions [B, T] (left-padded batches)
            cos, sin = cos[:, None], sin[:, None]
        x = self.wte(tokens) * self.embeddings_scale
        for block in self.blocks:
            x = block(x, (cos, sin), cache, mask)
        return self.transformer["ln_f"](x)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.cfg.tie_embeddings else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight) * self.logits_scale

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Logits; or, given `labels` and `loss_mask`, the training loss (through `forward`, so wrappers such as
        DDP and FSDP2 see every training call)."""
        hidden = self.hidden_states(tokens, cache, **kwargs)
        if labels is not None:
            assert loss_mask is not None
            return linear_cross_entropy(hidden, self.head_weight, labels, loss_mask, self.logits_scale)
        return self.logits(hidden)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Crystal's loss: Σ mask·CE / (B·T), i.e. divided by all positions, not by unmasked ones."""
        return self(tokens, labels=labels, loss_mask=loss_mask)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
