"""A small *trained* block-diffusion LM that the project owns (byte-level, Python source).

Why it exists: random-weight models say nothing about how much FlashBlock's approximate
reuse (``refresh="block"``) changes the output of a model that has learned something.
``examples/train_tiny.py`` trains ``BlockDiffusionLM`` (examples/block_diffusion_lm.py,
unchanged) on the Python standard library's own ``.py`` files; the fp16 checkpoint is
committed at ``examples/checkpoints/tiny_python_bd.pt`` and described in the ``.md`` beside it.

This module holds what both training and users need, CPU-friendly:

* ``load_tiny_trained()`` - the checkpoint as an eval-mode ``BlockDiffusionLM``;
* ``stdlib_bytes(split)`` - the deterministic train/val data (sorted file list, every
  20th file is validation);
* ``bd_batch`` / ``diffusion_loss`` / ``eval_loss`` - the masked block-diffusion objective
  (BD3-LM-style ``x_noisy ++ x_clean`` layout in one forward, 1/t-weighted cross-entropy,
  i.e. the negative ELBO in nats per byte);
* ``encode`` / ``decode`` - bytes <-> ids (vocab 256 = bytes, [MASK] = 255, never in UTF-8).
"""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import asdict, fields
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

try:  # importable both as ``examples.tiny_trained`` and from inside ``examples/``
    from .block_diffusion_lm import BlockDiffusionConfig, BlockDiffusionLM
except ImportError:
    from block_diffusion_lm import BlockDiffusionConfig, BlockDiffusionLM

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints",
                                  "tiny_python_bd.pt")
MASK_ID = 255
VAL_EVERY = 20  # every 20th file of the sorted list is validation
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


# --------------------------------------------------------------------------- data


def stdlib_files() -> List[str]:
    """Sorted relative paths of the stdlib's ``.py`` files, without test dirs and site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
            if f.endswith(".py"):
                out.append(os.path.normpath(os.path.join(rel, f)))
    return sorted(out)


def stdlib_bytes(split: str) -> torch.Tensor:
    """All files of ``split`` ("train" or "val") concatenated (each followed by a blank line)
    as a uint8 tensor. Files that contain 0xFF (the mask id) are skipped."""
    if split not in ("train", "val"):
        raise ValueError(split)
    root = sysconfig.get_paths()["stdlib"]
    chunks = []
    for i, rel in enumerate(stdlib_files()):
        if (i % VAL_EVERY == VAL_EVERY - 1) != (split == "val"):
            continue
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
        if b"\xff" in data:
            continue
        chunks.append(data.rstrip(b"\n") + b"\n\n\n")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def encode(text) -> torch.Tensor:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.tensor(list(data), dtype=torch.long)


def decode(ids) -> str:
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    return bytes(i for i in ids if i != MASK_ID).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- objective


def bd_mask(length: int, block_size: int, shift: int, device) -> torch.Tensor:
    """Bool [1, 1, 2L, 2L] for the ``x_noisy ++ x_clean`` layout (True = attend).

    Block of position i: ``(i + shift) // block_size`` (``shift`` in [0, block_size) makes the
    first block shorter, like a prompt that is not block-aligned). A noisy query sees the noisy
    tokens of its own block (bidirectional) and the clean tokens of earlier blocks; a clean
    query sees clean tokens of its own and earlier blocks (block-causal, as each committed
    block's K/V is computed at inference) and nothing noisy.
    """
    blk = (torch.arange(length, device=device) + shift) // block_size
    same = blk[:, None] == blk[None, :]
    earlier = blk[None, :] < blk[:, None]
    upto = blk[None, :] <= blk[:, None]
    none = torch.zeros(length, length, dtype=torch.bool, device=device)
    top = torch.cat([same, earlier], dim=1)
    bottom = torch.cat([none, upto], dim=1)
    return torch.cat([top, bottom], dim=0)[None, None]


def bd_batch(x: torch.Tensor, block_size: int, shift: int, generator: Optional[torch.Generator] = None,
             t_min: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise clean ids ``x`` [B, L]: one t per (row, block), stratified over the batch (lower
    variance than i.i.d.); each token of a block is masked with probability t.

    Returns ``input_ids`` [B, 2L] (noisy ++ clean), ``masked`` [B, L] bool, ``t`` [B, L] (the
    block's t at every position) and the attention mask [1, 1, 2L, 2L].
    The random draws use ``generator`` (on ``x``'s device) or the global RNG.
    """
    b, length = x.shape
    dev = x.device
    blk = (torch.arange(length, device=dev) + shift) // block_size
    nblk = int(blk[-1]) + 1
    n = b * nblk
    u = torch.rand((), device=dev, generator=generator)
    strata = (torch.arange(n, device=dev, dtype=torch.float32) + u) / n
    strata = strata[torch.randperm(n, device=dev, generator=generator)].view(b, nblk)
    t = strata.clamp_min(t_min)[:, blk]  # [B, L]
    masked = torch.rand((b, length), device=dev, generator=generator) < t
    noisy = torch.where(masked, torch.full_like(x, MASK_ID), x)
    return torch.cat([noisy, x], dim=1), masked, t, bd_mask(length, block_size, shift, dev)


def diffusion_loss(model: BlockDiffusionLM, x: torch.Tensor, shift: int,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Negative ELBO in nats per byte: sum over masked positions of CE / t, divided by B*L."""
    b, length = x.shape
    inp, masked, t, mask = bd_batch(x, model.config.block_size, shift, generator)
    pos = torch.arange(length, device=x.device).repeat(2)
    logits = model(inp, position_ids=pos, attention_mask=mask)[0][:, :length]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x.reshape(-1),
                         reduction="none").view(b, length)
    return (ce * masked / t).sum() / (b * length)


def val_windows(data: torch.Tensor, num: int, length: int) -> torch.Tensor:
    """``num`` evenly spaced windows of ``length`` bytes (deterministic), as long ids [num, L]."""
    starts = torch.linspace(0, len(data) - length - 1, num).long()
    idx = starts[:, None] + torch.arange(length)[None]
    return data[idx].long()


@torch.no_grad()
def eval_loss(model: BlockDiffusionLM, data: torch.Tensor, num_windows: int = 32, length: int = 512,
              batch: int = 16, seed: int = 1234, device=None) -> float:
    """Mean negative ELBO (nats/byte) over fixed validation windows with a fixed noise seed.
    Windows ``i`` use block shift ``i % block_size``. Divide by ln 2 for bits per byte."""
    device = device or next(model.parameters()).device
    windows = val_windows(data, num_windows, length).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for i in range(0, num_windows, batch):
        x = windows[i:i + batch]
        shift = (i // batch) % model.config.block_size
        total += float(diffusion_loss(model, x, shift, g)) * x.shape[0]
    return total / num_windows


# --------------------------------------------------------------------------- checkpoint


def config_to_dict(config: BlockDiffusionConfig) -> dict:
    d = asdict(config)
    d.pop("dtype", None)
    return d


def load_tiny_trained(path: str = DEFAULT_CHECKPOINT, device="cpu", dtype=torch.float32) -> BlockDiffusionLM:
    """The trained byte-level block-diffusion LM, in eval mode on ``device`` in ``dtype``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    names = {f.name for f in fields(BlockDiffusionConfig)}
    config = BlockDiffusionConfig(**{k: v for k, v in ckpt["config"].items() if k in names}, dtype=dtype)
    model = BlockDiffusionLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in ckpt["state_dict"].items()})
    return model.to(device=device, dtype=dtype).eval()


def sample(model: BlockDiffusionLM, prompt, num_blocks: int = 16, steps: Optional[int] = None) -> str:
    """Greedy ``generate`` from a text/bytes prompt; returns the decoded text (prompt included)."""
    dev = next(model.parameters()).device
    ids = encode(prompt).to(dev)[None]
    return decode(model.generate(ids, num_blocks=num_blocks, steps=steps)[0].cpu())


def bits_per_byte(nats: float) -> float:
    return nats / math.log(2)
