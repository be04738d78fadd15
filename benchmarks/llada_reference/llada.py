"""The official LLaDA model and sampler, written from docs/LLADA.md (sections 1 and 2).

The model works directly on the *official* parameter names (`model.transformer.blocks.N.*`) and the
sampler is the full-sequence loop of the official `generate`.
"""

import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# The official architecture (docs/LLADA.md section 1), as a function of an official-layout state dict.
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
    head_name = "model.transformer.wte.weight" if cfg.get("weight_tying") else "model.transformer.ff_out.weight"
    head = state[head_name]
    return x @ head.T


# ----------------------------------------------------------------------------------------------------
# The official sampler (docs/LLADA.md section 2): full sequence, full [B, L, V] tensors, per-row topk; the
# low-confidence score is the softmax in the logits' own dtype (bf16 for a bf16 model), as the official code.
# ----------------------------------------------------------------------------------------------------


def _official_num_transfer_tokens(block_mask_index, steps):
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, : remainder[i]] += 1
    return num


def _official_gumbel(logits, temperature):
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def reference_generate(model_fn, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
                       temperature=0.0, cfg_scale=0.0, remasking="low_confidence", mask_id=126336,
                       logits_eos_inf=False, confidence_eos_eot_inf=False, eos_id=126081, eot_id=126348):
    """The official LLaDA `generate`, written from docs/LLADA.md. `model_fn(ids, attention_mask) -> logits`.

    `confidence_eos_eot_inf` as the official code runs it at T = 0: after the candidates are drawn, the EOS and EoT
    logits become -inf, so the confidence softmax is renormalised without them and EOS/EoT candidates get 0. The
    official chained assignment leaves EOS in the softmax at T > 0 (its noisy logits are then a copy); here both
    are removed at every temperature (the intended meaning), and with "random" remasking EOS/EoT candidates get
    the lowest finite score.
    """
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype)], dim=1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    for num_block in range(num_blocks):
        block_start = P + num_block * block_length
        block_end = block_start + block_length
        num_transfer = _official_num_transfer_tokens(x[:, block_start:block_end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = torch.cat([x, un_x], dim=0)
                both_mask = torch.cat([attention_mask, attention_mask]) if attention_mask is not None else None
                logits, un_logits = torch.chunk(model_fn(both, both_mask), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model_fn(x, attention_mask)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            x0 = torch.argmax(_official_gumbel(logits, temperature), dim=-1)
            if confidence_eos_eot_inf:
                logits = logits.clone()
                logits[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.gather(p, dim=-1, index=x0[..., None]).squeeze(-1)
            elif remasking == "random":
                x0_p = torch.rand(x0.shape, dtype=torch.float64)
            else:
                raise NotImplementedError(remasking)
            if confidence_eos_eot_inf and remasking == "random":
                x0_p = x0_p.masked_fill((x0 == eos_id) | (x0 == eot_id), torch.finfo(x0_p.dtype).min)
            x0_p[:, block_end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-torch.inf, dtype=x0_p.dtype))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer_index[j, select] = True
            x[transfer_index] = x0[transfer_index]
    return x
