"""The Crystal architecture checked against a float64 reference written here from the spec (crystal-spec §1.2),
independently of the model code: interleaved 25% rotary, 1/d_head scores, biases, SwiGLU up ⊙ SiLU(gate),
tied head with muP multipliers."""

from __future__ import annotations

import math

import torch

from crystal_lm.config import ModelConfig, MupConfig
from crystal_lm.model import build_model, count_parameters
from crystal_lm.model.crystal import KVCache
from crystal_lm.model.loss import linear_cross_entropy

CFG = ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=3, max_seq_len=32)
MUP = MupConfig(base_width=16)


def reference_forward(sd: dict[str, torch.Tensor], tokens: list[int], cfg: ModelConfig, mup: MupConfig):
    """Logits by the spec, one position and one head at a time, in float64."""
    p = {k: v.double() for k, v in sd.items()}
    d, H = cfg.d_model, cfg.n_heads
    hd = d // H
    rot = int(hd * cfg.rotary_pct)
    T = len(tokens)

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layer_norm_eps) * w + b

    def rope(vec, pos):  # GPT-J: pairs (0,1), (2,3), ... of the first `rot` dims
        out = vec.clone()
        for i in range(rot // 2):
            theta = pos / (cfg.rope_theta ** (2 * i / rot))
            a, b = vec[2 * i], vec[2 * i + 1]
            out[2 * i] = a * math.cos(theta) - b * math.sin(theta)
            out[2 * i + 1] = b * math.cos(theta) + a * math.sin(theta)
        return out

    x = p["transformer.wte.weight"][tokens] * mup.embeddings_scale
    for layer in range(cfg.n_layers):
        pre = f"transformer.h.{layer}."
        h = ln(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"])
        qkv = h @ p[pre + "attn.c_attn.weight"] + p[pre + "attn.c_attn.bias"]  # Conv1D: weight is [in, out]
        q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        o = torch.zeros(T, d, dtype=torch.float64)
        for head in range(H):
            cols = slice(head * hd, (head + 1) * hd)
            qh = torch.stack([rope(q[t, cols], t) for t in range(T)])
            kh = torch.stack([rope(k[t, cols], t) for t in range(T)])
            for t in range(T):
                scores = (kh[: t + 1] @ qh[t]) / hd  # muP: 1/d_head
                w = torch.softmax(scores, dim=0)
                o[t, cols] = w @ v[: t + 1, cols]
        x = x + o @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]
        h = ln(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"])
        up = h @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"]
        gate = h @ p[pre + "mlp.c_fc2.weight"] + p[pre + "mlp.c_fc2.bias"]
        m = up * (gate * torch.sigmoid(gate))
        x = x + m @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"]
    x = ln(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    return (x @ p["transformer.wte.weight"].T) * (mup.output_alpha * mup.base_width / cfg.d_model)


def _randomised_model():
    model = build_model(CFG, MUP, seed=0)
    with torch.no_grad():  # non-zero biases and norms so every term of the spec is exercised
        for _name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def test_forward_matches_float64_reference():
    model = _randomised_model().double()
    tokens = [3, 17, 42, 5, 88, 1, 60, 7, 33, 2, 19]
    ours = model(torch.tensor([tokens]))
    ref = reference_forward(model.state_dict(), tokens, CFG, MUP)
    assert torch.allclose(ours[0], ref, rtol=1e-9, atol=1e-9)


def test_kv_cache_decoding_equals_full_forward():
    model = _randomised_model().eval()
    tokens = torch.tensor([[5, 9, 2, 77, 31, 4, 8, 64]])
    full = model(tokens)
    cache = KVCache()
    logits = model(tokens[:, :3], cache)
    steps = [logits[:, -1]]
    for t in range(3, tokens.shape[1]):
        logits = model(tokens[:, t : t + 1], cache)
        steps.append(logits[:, -1])
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, 2:-1], atol=1e-5)


def test_architecture_facts():
    model = build_model(CFG, MUP, seed=0)
    names = dict(model.named_parameters())
    shapes = {
        "attn.c_attn": (48, 144),
        "attn.c_proj": (48, 48),
        "mlp.c_fc": (48, 128),
        "mlp.c_fc2": (48, 128),
        "mlp.c_proj": (128, 48),
    }
    for name, shape in shapes.items():
        assert names[f"transformer.h.0.{name}.weight"].shape == shape  # LLM360 layout: [in, out]
        assert f"transformer.h.0.{name}.bias" in names  # Crystal has biases everywhere in blocks
    assert "transformer.h.0.ln_1.bias" in names  # LayerNorm with bias, not RMSNorm
    assert not any("lm_head" in n for n in names)  # tied head: no separate matrix
    assert CFG.ffn_dim == int(8 * 48 / 3) and CFG.rotary_dim == 4
    d, f, V, L = CFG.d_model, CFG.ffn_dim, CFG.vocab_size, CFG.n_layers
    per_layer = 4 * d + 4 * (d * d + d) + 2 * (d * f + f) + (f * d + d)
    assert count_parameters(model) == V * d + L * per_layer + 2 * d


def test_loss_is_sum_over_mask_divided_by_all_positions():
    model = _randomised_model()
    tokens = torch.randint(0, CFG.vocab_size, (2, 10))
    labels = torch.randint(0, CFG.vocab_size, (2, 10))
    mask = torch.ones(2, 10)
    mask[1, 6:] = 0
    logits = model(tokens)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, CFG.vocab_size), labels.reshape(-1), reduction="none"
    )
    expected = (ce * mask.reshape(-1)).sum() / 20  # Crystal: Σ mask·CE / (B·T)
    assert torch.allclose(model.loss(tokens, labels, mask), expected, rtol=1e-5)


def test_chunked_cross_entropy_gradients_match_dense():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 7))
    m = (torch.rand(3, 7) > 0.3).double()
    ours = linear_cross_entropy(h, w, y, m, scale=0.7, chunk=5)
    g_ours = torch.autograd.grad(ours, (h, w))
    logits = (h @ w.T) * 0.7
    dense = (
        torch.nn.functional.cross_entropy(logits.reshape(-1, 50), y.reshape(-1), reduction="none")
        * m.reshape(-1)
    ).sum() / y.numel()
    g_dense = torch.autograd.grad(dense, (h, w))
    assert torch.allclose(ours, dense, rtol=1e-12)
    for a, b in zip(g_ours, g_dense, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_left_padded_batch_equals_each_prompt_alone():
    """Batched generation gives each row what it gets alone (positions restart after the padding)."""
    from crystal_lm.eval.generate import Sampling, generate_batch

    model = _randomised_model().eval()
    prompts = [[5, 9, 2, 77, 31, 4, 8], [12, 3], [40, 41, 42, 43]]
    greedy = Sampling(max_new_tokens=6, temperature=0)
    together = generate_batch(model, prompts, greedy, stop_ids=set(), pad_id=0)
    alone = [generate_batch(model, [p], greedy, stop_ids=set())[0] for p in prompts]
    assert together == alone and all(len(r) == 6 for r in together)


def test_chunked_cross_entropy_under_bf16_autocast_runs_bf16_gemms():
    """Under bf16 autocast every product of the fused loss is a bf16 GEMM, as a plain linear head's would be
    (an fp32 head-gradient GEMM is ~8x slower on a GPU), and the gradients still match the dense loss."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class GemmDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.dtype] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (
                torch.ops.aten.mm,
                torch.ops.aten.addmm,
                torch.ops.aten.addmm_,
                torch.ops.aten.bmm,
            ):
                self.seen.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    h = torch.randn(4, 64, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    y = torch.randint(0, 300, (4, 64))
    m = torch.ones(4, 64)
    gemms = GemmDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), gemms:
        ours = linear_cross_entropy(h, w, y, m, scale=0.5, chunk=64)
    assert len(gemms.seen) == 3 * 4 and set(gemms.seen) == {
        torch.bfloat16
    }  # logits, grad_h, grad_w per chunk
    g_ours = torch.autograd.grad(ours, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (h @ w.T).float() * 0.5
    dense = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), y.reshape(-1))
    g_dense = torch.autograd.grad(dense, (h, w))
    assert torch.allclose(ours, dense, rtol=1e-3)
    for a, b in zip(g_ours, g_dense, strict=True):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=0.05, atol=0.02 * b.abs().max().item())
