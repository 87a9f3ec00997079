"""Train a small byte-level masked block-diffusion LM on the Python standard library.

    python examples/train_tiny.py --device cuda --minutes 6 --compile
    python examples/train_tiny.py --device cpu --steps 20 --batch 4 --seq-len 64 --out /tmp/t.pt  # smoke

Model: ``BlockDiffusionLM`` from examples/block_diffusion_lm.py (reused, not copied).
Objective (BD3-LM style, see ``tiny_trained.diffusion_loss``): every row is a window of
``seq_len`` bytes cut into blocks of ``block_size``; each block gets its own t ~ U(0,1) and
each of its bytes becomes [MASK] (255) with probability t. One forward over
``x_noisy ++ x_clean`` with an explicit mask: noisy block -> itself + earlier clean blocks,
clean block -> itself + earlier clean blocks (block-causal, like the commit pass at
inference). Loss = CE on masked bytes weighted 1/t (negative ELBO, nats/byte).

Writes the checkpoint (config dict + fp16 state_dict + metadata) to ``--out`` and a
report (``.md`` beside it) with losses, bits/byte and greedy samples.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from block_diffusion_lm import BlockDiffusionConfig, BlockDiffusionLM  # noqa: E402
from tiny_trained import (bits_per_byte, config_to_dict, diffusion_loss, eval_loss,  # noqa: E402
                          load_tiny_trained, sample, stdlib_bytes, stdlib_files)

PROMPTS = [b"def ", b"import ", b"class ", b"    def __init__(self", b"if __name__ == "]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=100000, help="max optimizer steps")
    p.add_argument("--minutes", type=float, default=6.0, help="training time budget (wall clock)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "checkpoints", "tiny_python_bd.pt"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager)")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--sample-blocks", type=int, default=24)
    return p.parse_args(argv)


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int):
    """GPT-style init: N(0, 0.02) matrices and embeddings, residual outputs scaled by
    1/sqrt(2 * layers), zero biases, norms at 1."""
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_layers
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("bias"):
            p.zero_()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    use_amp = dev.type == "cuda" and not args.no_amp
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    config = BlockDiffusionConfig(
        vocab_size=256, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate_size=args.intermediate,
        block_size=args.block_size, denoising_steps=4, mask_token_id=255,
    )
    model = BlockDiffusionLM(config)
    init_weights(model, args.seed)
    model.to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())

    t0 = time.time()
    train = stdlib_bytes("train").to(dev)
    val = stdlib_bytes("val")
    n_files = len(stdlib_files())
    print(f"params {n_params:,}  train {len(train):,} B  val {len(val):,} B  ({n_files} files, "
          f"{time.time() - t0:.1f}s to load)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    fwd_model = model
    if args.compile:
        fwd_model = torch.compile(model, dynamic=False)

    data_gen = torch.Generator(device=dev).manual_seed(args.seed)
    noise_gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    ar = torch.arange(args.seq_len, device=dev)
    budget = args.minutes * 60.0

    def step_fn(m, step):
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), device=dev, generator=data_gen)
        x = train[starts[:, None] + ar[None]].long()
        shift = step % config.block_size
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = diffusion_loss(m, x, shift, noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach(), gnorm

    t_start = time.time()
    step = 0
    ema = None
    history = []
    compiled_ok = args.compile
    while step < args.steps:
        elapsed = time.time() - t_start
        if elapsed > budget:
            break
        progress = max(step / args.steps, elapsed / budget)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            loss, gnorm = step_fn(fwd_model, step)
        except Exception as e:  # compile trouble: carry on eagerly rather than lose the run
            if fwd_model is model:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); falling back to eager", flush=True)
            fwd_model, compiled_ok = model, False
            loss, gnorm = step_fn(fwd_model, step)
        step += 1
        if step % 50 == 0 or step == 1:
            lv = float(loss)
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            history.append((step, round(time.time() - t_start, 1), lv))
            print(f"step {step:6d}  t {time.time() - t_start:6.1f}s  lr {lr:.2e}  loss {lv:.4f}  "
                  f"ema {ema:.4f}  gnorm {float(gnorm):.2f}", flush=True)
    train_time = time.time() - t_start
    print(f"trained {step} steps in {train_time:.1f}s", flush=True)

    # ---- save fp16 checkpoint, then evaluate the *saved* weights (what users load)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {
        "steps": step, "train_seconds": round(train_time, 1), "batch": args.batch, "seq_len": args.seq_len,
        "lr": args.lr, "seed": args.seed, "params": n_params, "torch": str(torch.__version__),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(), "train_loss_ema": ema,
    }
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"config": config_to_dict(config), "state_dict": state, "meta": meta}, args.out)
    size_mb = os.path.getsize(args.out) / 1e6
    print(f"saved {args.out} ({size_mb:.2f} MB)", flush=True)

    loaded = load_tiny_trained(args.out, device=dev, dtype=torch.float32)
    val_loss = eval_loss(loaded, val, num_windows=args.val_windows, length=min(512, args.seq_len))
    # train loss on the same protocol (fixed windows of the train stream), for an honest gap
    train_eval = eval_loss(loaded, train.cpu(), num_windows=args.val_windows, length=min(512, args.seq_len))
    print(f"val loss {val_loss:.4f} nats/B = {bits_per_byte(val_loss):.3f} bits/B; "
          f"train (same protocol) {train_eval:.4f} = {bits_per_byte(train_eval):.3f} bits/B", flush=True)

    samples = []
    for prompt in PROMPTS:
        for steps in (config.block_size, config.denoising_steps):
            text = sample(loaded, prompt, num_blocks=args.sample_blocks, steps=steps)
            samples.append((prompt, steps, text))
            print(f"--- {prompt!r} steps/block={steps}\n{text}", flush=True)

    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None else str(argv)
    md = [
        "# tiny_python_bd: a small trained byte-level block-diffusion LM",
        "",
        "Produced by `examples/train_tiny.py`; load with `examples.tiny_trained.load_tiny_trained()`.",
        "Architecture: `BlockDiffusionLM` (examples/block_diffusion_lm.py). Data: the Python standard "
        "library's `.py` files of the training machine (test dirs and site-packages excluded; sorted list, "
        "every 20th file is validation). Objective: masked block diffusion, `x_noisy ++ x_clean` in one "
        "forward, block-causal clean stream, per-block t ~ U(0,1) (stratified), CE on masked bytes / t.",
        "",
        "| | |", "|---|---|",
        f"| command | `{cmd}` |",
        f"| device | {meta['device']} |",
        f"| torch / python | {torch.__version__} / {meta['python']} |",
        f"| config | {config_to_dict(config)} |",
        f"| parameters | {n_params:,} |",
        f"| data | train {len(train):,} bytes, val {len(val):,} bytes ({n_files} files) |",
        f"| batch x seq_len | {args.batch} x {args.seq_len} (bf16 autocast: {use_amp}, torch.compile: {compiled_ok}) |",
        f"| steps / train time | {step} / {train_time:.0f} s |",
        f"| train loss (EMA of logged steps) | {ema:.4f} nats/byte |",
        f"| train loss, eval protocol ({args.val_windows} fixed windows of 512 B, fixed noise seed) | "
        f"{train_eval:.4f} nats/byte = {bits_per_byte(train_eval):.3f} bits/byte |",
        f"| **val loss**, same protocol | **{val_loss:.4f} nats/byte = {bits_per_byte(val_loss):.3f} bits/byte** |",
        f"| checkpoint | fp16, {size_mb:.2f} MB; losses above are of the fp16 weights run in fp32 |",
        "",
        "Losses are the masked-diffusion negative ELBO (an upper bound on the NLL), per byte.",
        "",
        "## Loss curve (logged steps)",
        "",
        "step, seconds, loss: " + "; ".join(f"{s}, {t}, {l:.3f}" for s, t, l in history[:: max(1, len(history) // 25)]),
        "",
        "## Greedy samples (`model.generate`, fp32)",
        "",
    ]
    for prompt, steps, text in samples:
        md += [f"prompt `{prompt!r}`, {args.sample_blocks} blocks, {steps} denoising steps per block:", "",
               "```", text, "```", ""]
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as fh:
        fh.write("\n".join(md))
    print(f"wrote {md_path}", flush=True)


if __name__ == "__main__":
    main()
