"""Independent, deliberately plain reference implementations of the official LLaDA algorithms.

Written from ../shared/reference/LLADA.md, not from this package's code: the model works directly on the
*official* parameter names (`model.transformer.blocks.N.*`) and the sampler is the full-sequence loop of
the official `generate`. Tests compare the package against these.
"""

import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# The official architecture (LLADA.md section 1), as a function of an official-layout state dict.
# ----------------------------------------------------------------------------------------------------


def _rms_norm(x, weight, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x, theta):
    # x: [B, H, L, D]; rotate-half RoPE over the full head dimension, positions 0..L-1, in float32.
    B, H, L, D = x.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.arange(L, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x32 = x.float()
    x1, x2 = x32[..., : D // 2], x32[..., D // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def reference_logits(state: dict, cfg: dict, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Logits of the official LLaDA model. `state` uses official names; `cfg` official config keys."""
    d, n_heads = cfg["d_model"], cfg["n_heads"]
    n_kv = cfg.get("n_kv_heads") or n_heads
    hd = d // n_heads
    eps = cfg.get("rms_norm_eps", 1e-5)
    theta = cfg.get("rope_theta", 500000.0)
    B, L = input_ids.shape
    x = state["model.transformer.wte.weight"][input_ids]
    bias = torch.zeros(B, 1, 1, L, dtype=torch.float32)
    if attention_mask is not None:
        bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = _rms_norm(x, state[p + "attn_norm.weight"], eps)
        q = (h @ state[p + "q_proj.weight"].T).view(B, L, n_heads, hd).transpose(1, 2)
        k = (h @ state[p + "k_proj.weight"].T).view(B, L, n_kv, hd).transpose(1, 2)
        v = (h @ state[p + "v_proj.weight"].T).view(B, L, n_kv, hd).transpose(1, 2)
        q, k = _rope(q, theta), _rope(k, theta)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(hd) + bias  # no causal mask
        att = torch.softmax(scores, dim=-1).to(v.dtype) @ v
        x = x + att.transpose(1, 2).reshape(B, L, d) @ state[p + "attn_out.weight"].T
        h = _rms_norm(x, state[p + "ff_norm.weight"], eps)
        gate = h @ state[p + "ff_proj.weight"].T
        up = h @ state[p + "up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ state[p + "ff_out.weight"].T
    x = _rms_norm(x, state["model.transformer.ln_f.weight"], eps)
    head = state["model.transformer.wte.weight"] if cfg.get("weight_tying") else state["model.transformer.ff_out.weight"]
    return x @ head.T
