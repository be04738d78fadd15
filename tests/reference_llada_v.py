"""An independent plain-torch / PIL implementation of the official LLaDA-V forward, for parity tests.

Written from the official algorithm (ML-GSAI/LLaDA-V: `mm_utils.process_anyres_image`, the SigLIP tower without
its last layer, `mlp2x_gelu`, `llava_arch.prepare_inputs_labels_for_multimodal`, the Llama-named LLaDA language
model, `generate_with_embeds`), on official parameter names and official conventions: image sizes are
(width, height), grid pinpoints [width, height], the prompt holds one `IMAGE_TOKEN_INDEX` per image. It imports
nothing from llada_hf.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


IMAGE_TOKEN_INDEX = -200
TOWER = "model.vision_tower.vision_tower.vision_model."


# ---- image preprocessing (official process_anyres_image) -------------------------------------------------------


def best_resolution(size_wh, pinpoints_wh):
    width, height = size_wh
    best, best_effective, best_wasted = None, 0, float("inf")
    for w, h in pinpoints_wh:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (w, h), effective, wasted
    return best


def _to_pixels(image):
    array = np.asarray(image.convert("RGB")).astype(np.float64) / 255.0
    array = ((array.astype(np.float32) - 0.5) / 0.5).astype(np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)  # [3, H, W]


def anyres_crops(image, pinpoints_wh, crop):
    """[1 + rows * cols, 3, crop, crop]: the squashed image, then the crops of the resized + padded image."""
    image = image.convert("RGB")
    target_w, target_h = best_resolution(image.size, pinpoints_wh)
    scale_w, scale_h = target_w / image.width, target_h / image.height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(image.height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(image.width * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    crops = [image.resize((crop, crop), Image.BICUBIC)]
    crops += [
        canvas.crop((x, y, x + crop, y + crop)) for y in range(0, target_h, crop) for x in range(0, target_w, crop)
    ]
    return torch.stack([_to_pixels(c) for c in crops])


def padded_square_crop(image, crop):
    """The official multi-image preprocessing: pad to a square with the mean colour (127), resize."""
    image = image.convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return _to_pixels(canvas.resize((crop, crop), Image.BICUBIC))[None]


# ---- vision tower (SigLIP, last layer removed, no post layer norm) and projector -----------------------------------


def tower_features(state, tower_cfg, pixels):
    """[crops, patches, vision hidden] from the last kept encoder layer."""
    patch, heads = tower_cfg["patch_size"], tower_cfg["num_attention_heads"]
    eps = tower_cfg.get("layer_norm_eps", 1e-6)
    x = F.conv2d(pixels, state[TOWER + "embeddings.patch_embedding.weight"],
                 state[TOWER + "embeddings.patch_embedding.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + state[TOWER + "embeddings.position_embedding.weight"]
    layer = 0
    while TOWER + f"encoder.layers.{layer}.layer_norm1.weight" in state:
        p = lambda name: state[TOWER + f"encoder.layers.{layer}.{name}"]  # noqa: E731
        h = F.layer_norm(x, x.shape[-1:], p("layer_norm1.weight"), p("layer_norm1.bias"), eps)
        b, n, d = h.shape
        q, k, v = (F.linear(h, p(f"self_attn.{t}_proj.weight"), p(f"self_attn.{t}_proj.bias")) for t in "qkv")
        q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1) @ v
        x = x + F.linear(
            attn.transpose(1, 2).reshape(b, n, d), p("self_attn.out_proj.weight"), p("self_attn.out_proj.bias")
        )
        h = F.layer_norm(x, x.shape[-1:], p("layer_norm2.weight"), p("layer_norm2.bias"), eps)
        h = F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias")), approximate="tanh")
        x = x + F.linear(h, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        layer += 1
    return x


def project(state, features):
    h = F.gelu(F.linear(features, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"]))
    return F.linear(h, state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])


# ---- packing (official spatial_unpad + anyres_max_N) ---------------------------------------------------------------


def pack_anyres(state, features, size_wh, pinpoints_wh, crop, max_patches):
    """features [1 + rows * cols, unit², D] -> [tokens, D]."""
    unit = math.isqrt(features.shape[1])
    w_best, h_best = best_resolution(size_wh, pinpoints_wh)
    cols, rows = w_best // crop, h_best // crop
    grid = features[1:].view(rows, cols, unit, unit, -1)
    grid = grid.permute(4, 0, 2, 1, 3).reshape(features.shape[-1], rows * unit, cols * unit)  # [D, H, W]
    width, height = size_wh
    cur_h, cur_w = grid.shape[1:]
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))
        pad = (cur_h - new_h) // 2
        grid = grid[:, pad:cur_h - pad, :]
    else:
        new_w = int(width * (cur_h / height))
        pad = (cur_w - new_w) // 2
        grid = grid[:, :, pad:cur_w - pad]
    d, h, w = grid.shape
    times = math.sqrt(h * w / (max_patches * unit**2))
    if times > 1.1:
        grid = F.interpolate(grid[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    newline = state["model.image_newline"][:, None, None].expand(d, grid.shape[1], 1)
    grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((features[0], grid))


def image_features(state, tower_cfg, images, pinpoints_wh, crop, max_patches):
    """Packed features per image of one prompt: anyres for a single image, one padded crop + newline otherwise."""
    if len(images) == 1:
        crops = anyres_crops(images[0], pinpoints_wh, crop)
        return [pack_anyres(state, project(state, tower_features(state, tower_cfg, crops)), images[0].size,
                            pinpoints_wh, crop, max_patches)]
    out = []
    for image in images:
        feats = project(state, tower_features(state, tower_cfg, padded_square_crop(image, crop)))[0]
        out.append(torch.cat((feats, state["model.image_newline"][None])))
    return out


def merged_embeddings(state, ids, features):
    """ids: 1-D with one IMAGE_TOKEN_INDEX per image -> [L, D] with the image features spliced in."""
    table = state["model.embed_tokens.weight"]
    pieces, start, images = [], 0, iter(features)
    for pos in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist() + [len(ids)]:
        pieces.append(table[ids[start:pos]])
        if pos < len(ids):
            pieces.append(next(images))
        start = pos + 1
    return torch.cat(pieces)


# ---- the language model (Llama names, bidirectional attention, rotary in the model dtype) ------------------------


def lm_logits(state, cfg, embeds):
    """embeds [B, L, D] (no padding) -> logits [B, L, vocab]."""
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]

    def rms(x, weight):
        return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rope(x):
        dim, length = x.shape[-1], x.shape[-2]
        inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
        freqs = torch.outer(torch.arange(length).float(), inv)
        cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
        rotated = torch.cat((-x[..., dim // 2:], x[..., : dim // 2]), dim=-1)
        return x * cos + rotated * sin

    x = embeds
    b, n, d = x.shape
    hd = d // heads
    layer = 0
    while f"model.layers.{layer}.input_layernorm.weight" in state:
        p = lambda name: state[f"model.layers.{layer}.{name}"]  # noqa: E731
        h = rms(x, p("input_layernorm.weight"))
        q = F.linear(h, p("self_attn.q_proj.weight")).view(b, n, heads, hd).transpose(1, 2)
        k = F.linear(h, p("self_attn.k_proj.weight")).view(b, n, kv_heads, hd).transpose(1, 2)
        v = F.linear(h, p("self_attn.v_proj.weight")).view(b, n, kv_heads, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        x = x + F.linear(attn.transpose(1, 2).reshape(b, n, d), p("self_attn.o_proj.weight"))
        h = rms(x, p("post_attention_layernorm.weight"))
        x = x + F.linear(F.silu(F.linear(h, p("mlp.gate_proj.weight"))) * F.linear(h, p("mlp.up_proj.weight")),
                         p("mlp.down_proj.weight"))
        layer += 1
    return F.linear(rms(x, state["model.norm.weight"]), state["lm_head.weight"])


# ---- the official sampler (generate_with_embeds), batch size 1, with or without stop sequences ---------------------


def _num_transfer_tokens(block_mask, steps):
    count = block_mask.sum(dim=1, keepdim=True)
    base, remainder = count // steps, count % steps
    out = base.expand(-1, steps).clone()
    out[torch.arange(steps)[None] < remainder] += 1
    return out


def _first_stop(answer, stop_sequences):
    """The earliest answer position where one of the id sequences starts, or None (the official scan)."""
    found = None
    for sequence in stop_sequences:
        for start in range(answer.shape[0] - len(sequence) + 1):
            if answer[start:start + len(sequence)].tolist() == list(sequence):
                found = start if found is None else min(found, start)
                break
    return found


def generate_with_embeds(logits_fn, embed_table, inputs_embeds, mask_id, suppress, steps, gen_length, block_length,
                         cfg_scale=0.0, stop_sequences=None):
    """The official low-confidence sampler at temperature 0 on prompt embeddings [1, P, D]: answer ids [1, G].

    Masked positions are found by comparing embeddings with the mask embedding; at masked positions the
    `suppress` ids get -inf; the score is a float64 softmax of the float32 logits; a block without masks ends.
    With `stop_sequences` (id lists; the official demo passes the tokenized `<|eot_id|>`): after every step the
    committed answer is scanned for them; once one is found, only masks before it may be committed (the step's
    count unchanged), decoding ends when none is left before it, and the answer is cut there: ids [1, <= G].
    """
    prompt_length = inputs_embeds.shape[1]
    total = prompt_length + gen_length
    mask_embed = embed_table[mask_id][None]  # [1, D]
    x_embeds = mask_embed.repeat(1, total, 1)
    x_embeds[:, :prompt_length] = inputs_embeds
    x = torch.full((1, total), mask_id, dtype=torch.long)
    prompt_index = torch.zeros(1, total, dtype=torch.bool)
    prompt_index[:, :prompt_length] = True
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    stop = None  # the answer position of the earliest stop sequence committed so far
    for block in range(num_blocks):
        start, end = prompt_length + block * block_length, prompt_length + (block + 1) * block_length
        if stop is not None and prompt_length + stop <= start:
            break
        block_mask = torch.all(torch.abs(x_embeds[:, start:end] - mask_embed) < 1e-5, dim=2)
        transfer = _num_transfer_tokens(block_mask, steps)
        for step in range(steps):
            mask_index = torch.all(torch.abs(x_embeds - mask_embed) < 1e-5, dim=2)
            if stop is not None and not mask_index[0, prompt_length:prompt_length + stop].any():
                break
            if not mask_index[0, start:end].any():
                break
            if cfg_scale > 0:
                unconditional = x_embeds.clone()
                unconditional[prompt_index] = mask_embed.expand(total, -1)[prompt_index[0]]
                cond, uncond = logits_fn(torch.cat([x_embeds, unconditional])).float().chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = logits_fn(x_embeds).float()
            for token in suppress:
                logits[:, :, token] = torch.where(mask_index, -float("inf"), logits[:, :, token])
            x0 = logits.argmax(-1)
            x0_p = torch.gather(F.softmax(logits.double(), dim=-1), -1, x0[..., None])[..., 0]
            x0_p[:, prompt_length + stop if stop is not None else end:] = -float("inf")
            x0_embeds = torch.where(mask_index[..., None], embed_table[x0], x_embeds)
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            chosen = torch.zeros_like(x0, dtype=torch.bool)
            chosen[0, torch.topk(confidence[0], k=int(transfer[0, step])).indices] = True
            x_embeds[chosen] = x0_embeds[chosen]
            x[chosen] = x0[chosen]
            if stop_sequences:
                found = _first_stop(x[0, prompt_length:], stop_sequences)
                stop = found if stop is None or (found is not None and found < stop) else stop
    return x[:, prompt_length:] if stop is None else x[:, prompt_length:prompt_length + stop]
