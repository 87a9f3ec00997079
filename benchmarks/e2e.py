"""End to end, the benchmark users read: ms per block of three block-diffusion models, five variants.

Models (random weights; bf16 on the GPU), each a :class:`fbcompile.bench.Workload`, picked by ``--model``:

- ``lm``: the example LM (``examples/block_diffusion_lm.py``) at Qwen2-1.5B shape (28 layers, 12 query
  / 2 KV heads, D 128), block 32, 8 denoising steps; the cache a list of per-layer ``(k, v)``.
- ``gemma``: HF ``DiffusionGemmaForBlockDiffusion`` at its real layer shapes (hidden 2304, head_dim 256,
  global layers 512; MoE 8 x top-2 of width 2048, our choice: the config has no default) with 6 layers
  (5 sliding-window + 1 global), canvas 256, 8 steps, each step fed the previous step's logits
  (self-conditioning) as its ``generate`` does. Weights: the decoder and LM head (the encoder and
  vision tower only prefill).
- ``video``: the example video DiT (``examples/video_ar_diffusion.py``) at ~1.3B (30 layers, hidden
  1536, 12 heads of 128, Wan-like 480x832 latents: 1560 tokens per frame), chunks of 3 latent frames,
  4 steps; throughput in frames per second.
- ``wan``: the Wan-style causal video DiT (``examples/wan_causal_video.py``) at Wan2.1-1.3B's shapes
  (30 layers, hidden 1536, 12 heads of 128, FFN 8960, 480x832 latents), as LongLive runs it: a rolling
  cache of ``context`` tokens (whole frames, 3 of them sinks) that is full, so every chunk rolls it; the
  real cache written after all layers; chunks of 3 latent frames, 4 denoising steps and the clean pass
  that writes the cache (5 forwards). Its graphs break at ``.item()`` in every layer and read the CPU
  ``grid_sizes``, as Wan's do.

Each cache is filled with random tensors of the right shape (no prefill), so 128K contexts are cheap;
rows that do not fit in memory are recorded as skipped. ``--tiny`` uses small shapes for the CPU.

    python benchmarks/e2e.py --model lm --contexts 8k,32k --out benchmarks/results/e2e_h200
    python -m fbcompile bench --workloads benchmarks.e2e:workloads --model lm      # the same
    python benchmarks/e2e.py --tiny --contexts 64,128 --batches 1 --variants eager,block --compiler eager
"""
from __future__ import annotations

import inspect

import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fbcompile.bench import Block, Workload, main, weight_bytes  # noqa: E402
from examples.block_diffusion_lm import BlockDiffusionConfig, BlockDiffusionLM, init_random_weights  # noqa: E402
from examples.video_ar_diffusion import VideoARConfig, VideoARDiffusion  # noqa: E402
from examples.wan_causal_video import WanCausalConfig, WanCausalVideo  # noqa: E402

QWEN_1_5B = dict(vocab_size=32000, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                 intermediate_size=8960, block_size=32)
TINY_LM = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
               intermediate_size=128, block_size=8)
GEMMA_6_LAYERS = dict(num_hidden_layers=6, num_experts=8, top_k_experts=2, moe_intermediate_size=2048)
TINY_GEMMA = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, global_head_dim=64, sliding_window=64, num_experts=4,
                  top_k_experts=2, moe_intermediate_size=64)
DIT_1_3B = dict(in_channels=16, height=60, width=104, hidden_size=1536, num_heads=12, head_dim=128, num_layers=30)
TINY_DIT = dict(in_channels=4, height=8, width=8, hidden_size=64, num_heads=4, head_dim=16, num_layers=2)
WAN_1_3B = dict(in_channels=16, height=60, width=104, frames_per_chunk=3, dim=1536, num_heads=12, ffn_dim=8960,
                num_layers=30, freq_dim=256, text_dim=4096, text_len=512, sink_frames=3)
TINY_WAN = dict(in_channels=4, height=8, width=8, frames_per_chunk=2, dim=64, num_heads=4, ffn_dim=128, num_layers=2,
                freq_dim=32, text_dim=32, text_len=8, sink_frames=1)


# --------------------------------------------------------------------------- lm


def build_lm(shape, device, dtype):
    with torch.device(device):
        model = BlockDiffusionLM(BlockDiffusionConfig(**shape))
    # variance-preserving weights: the example's sharper default init makes a 28-layer bf16 forward chaotic
    # (eager bf16 against fp32: relative error 1.0), so no variant's error against eager would mean anything
    return init_random_weights(model, seed=0, scales={}).to(dtype).eval()


def prepare_lm(steps, model, context, batch):
    cfg, p = model.config, next(model.parameters())
    gen = torch.Generator(p.device).manual_seed(1)
    shape = (batch, cfg.num_kv_heads, context, cfg.head_dim)
    cache = [tuple(torch.randn(shape, generator=gen, device=p.device, dtype=p.dtype) for _ in "kv")
             for _ in range(cfg.num_layers)]
    for k, v in cache:  # one compiled graph for every context length
        torch._dynamo.mark_dynamic(k, 2)
        torch._dynamo.mark_dynamic(v, 2)
    x = torch.full((batch, cfg.block_size), cfg.mask_token_id, device=p.device)
    pos = torch.arange(context, context + cfg.block_size, device=p.device)[None].expand(batch, -1)

    def run():
        x.fill_(cfg.mask_token_id)
        for step in range(steps):
            torch.compiler.cudagraph_mark_step_begin()  # under reduce-overhead: each call a new step
            model(x, past_key_values=cache, position_ids=pos)
            x[:, step] = step + 1  # the block changes between steps, as a sampler changes it

    def first_step(m):
        x.fill_(cfg.mask_token_id)
        return m(x, past_key_values=cache, position_ids=pos)[0]
    external = 4 * batch * cfg.num_heads * cfg.block_size * context * cfg.head_dim * cfg.num_layers
    return Block(run, sum(t.nbytes for kv in cache for t in kv), first_step, external)


# --------------------------------------------------------------------------- gemma


def build_gemma(text, canvas, device, dtype):
    import transformers
    # the vision tower given explicitly: some transformers versions default it to None and then fail to
    # build the encoder (the benchmark never runs it: gemma_weight_bytes leaves the encoder out)
    config = transformers.DiffusionGemmaConfig(text_config=dict(text, max_position_embeddings=262144),
                                               vision_config=transformers.Gemma4VisionConfig(), canvas_length=canvas)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.DiffusionGemmaForBlockDiffusion(config)
    return model.to(dtype).eval()


def gemma_weight_bytes(model):
    return weight_bytes(model, exclude=("model.encoder",))


def prepare_gemma(steps, model, context, batch):
    from transformers import DynamicCache
    p = next(model.parameters())
    gen = torch.Generator(p.device).manual_seed(1)
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(model.model.decoder.layers):
        attn = layer.self_attn
        shape = (batch, attn.k_proj.out_features // attn.head_dim, context, attn.head_dim)
        cache.update(*(torch.randn(shape, generator=gen, device=p.device, dtype=p.dtype) for _ in "kv"), i)
    for layer in cache.layers:  # a sliding-window layer keeps a view of its last tokens: drop the rest
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    length = model.config.canvas_length
    canvas = torch.randint(0, model.config.text_config.vocab_size, (batch, length), generator=gen, device=p.device)
    pos = torch.arange(context, context + length, device=p.device)[None].expand(batch, -1)

    # transformers releases name the cache argument ``cache`` or ``past_key_values``
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    inputs = {cache_kw: cache, "decoder_input_ids": canvas, "decoder_position_ids": pos}

    def run():
        logits = None
        for _ in range(steps):
            torch.compiler.cudagraph_mark_step_begin()  # as HF's generate does
            logits = model(**inputs, self_conditioning_logits=logits).logits

    def first_step(m):
        return m(**inputs).logits
    return Block(run, sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)), first_step)


# --------------------------------------------------------------------------- video


def build_video(shape, device, dtype):
    with torch.device(device):
        model = VideoARDiffusion(VideoARConfig(**shape))
    return init_random_weights(model, seed=0, scales={".attn.q": 2.0, ".attn.k": 2.0}).to(dtype).eval()


def prepare_video(steps, model, context, batch):
    """``context`` cached tokens, rounded down to whole frames."""
    cfg, p = model.config, next(model.parameters())
    gen = torch.Generator(p.device).manual_seed(1)
    cached = context // cfg.tokens_per_frame * cfg.tokens_per_frame
    shape = (batch, cached, cfg.num_heads, cfg.head_dim)
    cache = [tuple(torch.randn(shape, generator=gen, device=p.device, dtype=p.dtype) for _ in "kv")
             for _ in range(cfg.num_layers)]
    for k, v in cache:
        torch._dynamo.mark_dynamic(k, 1)
        torch._dynamo.mark_dynamic(v, 1)
    noise = torch.randn((batch, cfg.in_channels, cfg.chunk_frames, cfg.height, cfg.width), generator=gen,
                        device=p.device, dtype=p.dtype)
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()

    def run():
        x = noise
        for t_now, t_next in zip(times[:-1], times[1:]):
            t = torch.full((batch,), t_now, device=p.device, dtype=p.dtype)
            torch.compiler.cudagraph_mark_step_begin()
            x = x + (t_next - t_now) * model(x, t, past_key_values=cache)[0]

    def first_step(m):
        return m(noise, torch.full((batch,), times[0], device=p.device, dtype=p.dtype), past_key_values=cache)[0]
    external = 4 * batch * cfg.num_heads * cfg.chunk_tokens * cached * cfg.head_dim * cfg.num_layers
    return Block(run, sum(t.nbytes for kv in cache for t in kv), first_step, external)


# --------------------------------------------------------------------------- wan


def build_wan(shape, device, dtype):
    # the attention reads the whole cache, whatever capacity prepare_wan gives it
    cfg = WanCausalConfig(**shape, cache_mode="longlive_deferred", window_frames=1 << 20)
    with torch.device(device):
        model = WanCausalVideo(cfg)
    return init_random_weights(model, seed=0, scales={}).to(dtype).eval()  # variance-preserving, as the LM's


def prepare_wan(steps, model, context, batch):
    """A full rolling cache of ``context`` tokens rounded down to whole frames (at least the sinks and two
    chunks); every block is a new chunk, which rolls it."""
    cfg, p = model.config, next(model.parameters())
    gen = torch.Generator(p.device).manual_seed(1)
    frames = max(context // cfg.frame_tokens, cfg.sink_frames + 2 * cfg.frames_per_chunk)
    capacity, chunk = frames * cfg.frame_tokens, cfg.frames_per_chunk * cfg.frame_tokens
    shape = (batch, capacity, cfg.num_heads, cfg.head_dim)
    kv_cache = [{"k": torch.randn(shape, generator=gen, device=p.device, dtype=p.dtype),
                 "v": torch.randn(shape, generator=gen, device=p.device, dtype=p.dtype),
                 "global_end_index": torch.zeros(1, dtype=torch.long, device=p.device),
                 "local_end_index": torch.zeros(1, dtype=torch.long, device=p.device)} for _ in range(cfg.num_layers)]
    crossattn_cache = [{"is_init": False} for _ in range(cfg.num_layers)]
    noise = torch.randn((batch, cfg.frames_per_chunk, cfg.in_channels, cfg.height, cfg.width), generator=gen,
                        device=p.device, dtype=p.dtype)
    text = torch.randn((batch, cfg.text_len, cfg.text_dim), generator=gen, device=p.device, dtype=p.dtype)
    timesteps = torch.linspace(1000, 0, steps).round().long().tolist()  # the last one: the clean pass
    current_start = capacity  # the chunk after a full cache: it rolls the cache by one chunk

    def forward(m, x, step):
        t = torch.full((batch, cfg.frames_per_chunk), step, dtype=torch.long, device=p.device)
        return m(x, t, text, kv_cache, crossattn_cache, current_start)

    def new_chunk():
        for layer in kv_cache:
            layer["global_end_index"].fill_(current_start)
            layer["local_end_index"].fill_(capacity)

    def run():
        new_chunk()
        x = noise
        for step in timesteps:
            torch.compiler.cudagraph_mark_step_begin()
            x = x - step / 1000 * forward(model, x, step)

    def first_step(m):
        """The chunk's first forward through ``m``, the cache put back as it was (kept on the host meanwhile)."""
        kept = [tuple(layer[n].to("cpu", copy=True) for n in "kv") for layer in kv_cache]
        new_chunk()
        out = forward(m, noise, timesteps[0])
        for layer, (k, v) in zip(kv_cache, kept):
            layer["k"].copy_(k)
            layer["v"].copy_(v)
        return out

    external = 4 * batch * cfg.num_heads * chunk * (capacity - chunk) * cfg.head_dim * cfg.num_layers
    return Block(run, sum(layer[n].nbytes for layer in kv_cache for n in "kv"), first_step, external)


def workloads(tiny: bool = False) -> dict[str, Workload]:
    """The benchmark's models by name; ``tiny``: small shapes for the CPU (and the tests)."""
    lm, gemma, dit, wan = (TINY_LM, TINY_GEMMA, TINY_DIT, TINY_WAN) if tiny else (QWEN_1_5B, GEMMA_6_LAYERS, DIT_1_3B,
                                                                                WAN_1_3B)
    lm_steps, canvas, gemma_steps, video_steps, wan_steps = (4, 16, 4, 2, 3) if tiny else (8, 256, 8, 4, 5)
    return {
        "lm": Workload(partial(build_lm, lm), partial(prepare_lm, lm_steps), lm_steps, lm["block_size"],
                       description=f"example LM {lm}, {lm_steps} steps per block"),
        "gemma": Workload(partial(build_gemma, gemma, canvas), partial(prepare_gemma, gemma_steps), gemma_steps,
                          canvas, weight_bytes=gemma_weight_bytes,
                          description=f"HF DiffusionGemma {gemma}, canvas {canvas}, {gemma_steps} steps"),
        "video": Workload(partial(build_video, dit), partial(prepare_video, video_steps), video_steps,
                          VideoARConfig.chunk_frames, unit="frames",
                          description=f"example video DiT {dit}, chunks of 3 latent frames, {video_steps} steps"),
        "wan": Workload(partial(build_wan, wan), partial(prepare_wan, wan_steps), wan_steps, wan["frames_per_chunk"],
                        unit="frames", description=f"Wan-style causal DiT {wan}, LongLive's rolling cache (full, the "
                        f"real cache written after all layers), {wan_steps - 1} steps and the clean pass"),
    }


if __name__ == "__main__":
    main(workloads, prog="benchmarks/e2e.py")
