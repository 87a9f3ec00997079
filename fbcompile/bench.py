"""End-to-end benchmark core: ms per block of a block-diffusion loop, per variant, against its roofline.

Design: the library holds what is model-agnostic - the variants (eager, ``torch.compile`` default and
reduce-overhead, fbcompile exact and block, each also with CUDA graphs), the timing, the memory roofline, and the table / JSON /
plot - while the models are supplied by the caller as :class:`Workload` s. ``benchmarks/e2e.py``
defines the project's workloads (the example LM at Qwen2-1.5B shape, HF DiffusionGemma, the video
DiT) and runs :func:`main` with them; ``python -m fbcompile bench --workloads benchmarks.e2e:workloads``
loads them by name, as ``fidelity`` loads ``--model``. So the library never imports ``benchmarks/`` or
``examples/``, and a user benchmarks their own model by writing one ``Workload``.

Roofline of one block of ``steps`` forwards = bytes that must be read / HBM bandwidth: the weights
at every step, plus the cached keys/values once per block (fbcompile block mode: one refresh, the
other steps reuse the external attention) or at every step (every other variant, exact). Where the
workload states its external attention's FLOPs, also a FLOP floor: one forward's matmul and attention
FLOPs (torch's FLOP counter over the eager model's first step) at every step, less the external
attention at all but one step in block mode, at the GPU's datasheet bf16 rate. Many rows per key (a
video chunk's thousands of queries, a batch of 256 rows) make a block compute-bound: the byte roofline
alone would then put any implementation many times above it. ``floor_ratio`` = measured / the larger.

Per row: the median ms per block over ``--repeats`` blocks (CUDA events on the GPU, wall clock on the
CPU) after the first call (``first_call_s``: compile and CUDA-graph capture included; a later context
may recompile) and a warm-up; ``<unit>_per_s``; ``peak_mem_gb`` (GPU); the roofline and
measured/roofline; ``rel_err_vs_eager`` of the first step's output (where the workload gives one); for
fbcompile, refreshes and reuses per timed block. A row that runs out of device
memory is recorded as skipped. Results are rewritten after each variant, so a cut-off run keeps its rows.
``--isolate`` runs each row in a process of its own with empty compiler caches (:func:`run_isolated`).
"""
from __future__ import annotations

import argparse
import ast
import copy
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .api import new_request, optimize, reset, stats
from .config import Config

# Datasheet HBM bandwidths, bytes/s, and dense bf16/fp16 tensor FLOP/s (SXM parts).
BANDWIDTHS = {"h100": 3.35e12, "h200": 4.8e12}
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12}
VARIANTS = ("eager", "compile", "compile-ro", "exact", "block", "exact-ro", "block-ro")
VARIANT_NAMES = {"eager": "eager", "compile": "torch.compile", "compile-ro": "torch.compile reduce-overhead",
                 "exact": "fbcompile exact", "block": "fbcompile block",
                 "exact-ro": "fbcompile exact, CUDA graphs", "block-ro": "fbcompile block, CUDA graphs"}
# the fbcompile variants' Config fields; the "-ro" ones run as CUDA graphs (as reduce-overhead does)
FBCOMPILE_VARIANTS = {"exact": dict(refresh="always"), "block": dict(refresh="block"),
                      "exact-ro": dict(refresh="always", cuda_graphs=True),
                      "block-ro": dict(refresh="block", cuda_graphs=True)}
REUSING = {VARIANT_NAMES[v] for v, fields in FBCOMPILE_VARIANTS.items() if fields["refresh"] == "block"}


@dataclass
class Block:
    """One prepared block: ``run()`` does all of its denoising forwards over a filled cache."""
    run: Callable[[], Any]
    kv_bytes: int  # bytes of cached keys/values one forward reads
    # one forward of the block's first step through the given model, its main output (e.g. logits):
    # each variant's is compared with the eager model's (``rel_err_vs_eager``)
    first_step: Callable[[torch.nn.Module], torch.Tensor] | None = None
    # FLOPs of one forward's attention over the cached keys (4 x batch x query heads x block queries x
    # cached keys x head dim x layers); 0: not stated, no FLOP floor
    external_flops: float = 0.0


@dataclass(frozen=True)
class Workload:
    """A model and its block loop. ``build(device, dtype)`` returns the model (random weights, eval);
    ``prepare(model, context, batch)`` fills a cache of ``context`` tokens (random tensors, no
    prefill) and returns the :class:`Block`; ``weight_bytes(model)`` what one forward reads of the
    weights. A block produces ``block_size`` ``unit`` s (tokens or frames) per sequence."""
    build: Callable[[torch.device, torch.dtype], torch.nn.Module]
    prepare: Callable[[torch.nn.Module, int, int], Block]
    steps: int
    block_size: int
    unit: str = "tokens"
    weight_bytes: Callable[[torch.nn.Module], int] | None = None
    description: str = ""


def weight_bytes(model: torch.nn.Module, exclude: Sequence[str] = ()) -> int:
    """Bytes of the parameters a forward reads: every parameter once (tied ones once), except
    embedding tables, of which a forward gathers only a few rows - unless another module (a tied
    LM head) reads the same tensor whole. ``exclude``: module-name prefixes not run per step."""
    read = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        for p in module.parameters(recurse=False):
            read[id(p)] = p.numel() * p.element_size()
    return sum(read.values())


def roofline_ms(weights: int, kv: int, steps: int, reuse: bool, bandwidth: float) -> float:
    """Milliseconds to read what one block must read at ``bandwidth`` bytes/s."""
    read = steps * weights + (kv if reuse else steps * kv)
    return read / bandwidth * 1e3


def forward_flops(block: Block, eager: torch.nn.Module) -> float | None:
    """FLOPs of one forward (the block's first step through the eager model) as torch's FLOP counter
    counts them: matmuls and attention, not elementwise work; None where the counter cannot."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            block.first_step(eager)
    except Exception:  # an op the counter's formulas reject (e.g. grouped K/V shapes)
        return None
    return float(counter.get_total_flops())


def flop_floor_ms(forward: float, external: float, steps: int, reuse: bool, peak: float) -> float:
    """Milliseconds one block's counted FLOPs take at ``peak`` FLOP/s: ``forward`` at every step, of which
    block mode (``reuse``) computes the ``external`` attention at one step only."""
    flops = steps * forward - ((steps - 1) * external if reuse else 0.0)
    return flops / peak * 1e3


def make_variant(name: str, model: torch.nn.Module, compiler: str, options: dict | None = None) -> torch.nn.Module:
    """Wrap ``model.forward`` in place (the module keeps its attributes for the workload's loop);
    ``options``: more :class:`Config` fields for the fbcompile variants."""
    if name == "compile":
        model.forward = torch.compile(model.forward)
    elif name == "compile-ro":
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
    elif name in FBCOMPILE_VARIANTS:
        optimize(model, Config(compiler=compiler, **FBCOMPILE_VARIANTS[name], **(options or {})))
    elif name != "eager":
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(run: Callable[[], Any], before: Callable[[], None], repeats: int,
               device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, compile included; median ms of ``repeats`` calls after a warm-up);
    ``repeats + 2`` calls in all.
    CUDA events on the GPU, wall clock on the CPU; ``before`` runs untimed before each call."""
    before()
    t0 = time.perf_counter()
    run()
    _sync(device)
    first = time.perf_counter() - t0
    before()
    run()  # warm-up: a second shape-specialised compile, CUDA-graph recording
    times = []
    for _ in range(repeats):
        before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return first, times[len(times) // 2]


def bench_variant(workload: Workload, built: torch.nn.Module, variant: str, contexts: Sequence[int],
                  batches: Sequence[int], *, device: torch.device, repeats: int, bandwidth: float,
                  compiler: str, options: dict | None = None, progress=None,
                  peak_flops: float | None = None) -> list[dict]:
    """Rows for one variant of one workload: all contexts and batches (largest last, so that running out
    of memory skips only what does not fit), each batch on a copy of the ``built`` model compiled afresh,
    as a server at that batch runs it: through one compiled model a second batch size would be
    recompiled with the batch dynamic (dynamo's automatic dynamic shapes), which fbcompile's linear
    passes leave to cuBLAS."""
    weights = (workload.weight_bytes or weight_bytes)(built)
    rows = []
    for batch in batches:
        model = make_variant(variant, copy.deepcopy(built), compiler, options)
        before = (lambda: new_request(model)) if variant in FBCOMPILE_VARIANTS else (lambda: None)
        for context in contexts:
            row = dict(variant=VARIANT_NAMES[variant], context=context, batch=batch)
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                block = workload.prepare(model, context, batch)
                if variant in FBCOMPILE_VARIANTS:
                    reset(model)
                first, ms = time_block(block.run, before, repeats, device)
                roof = roofline_ms(weights, block.kv_bytes, workload.steps, VARIANT_NAMES[variant] in REUSING,
                                   bandwidth)
                row.update(ms_per_block=round(ms, 3),
                           **{f"{workload.unit}_per_s": round(workload.block_size * batch / ms * 1e3, 1)},
                           first_call_s=round(first, 2),
                           peak_mem_gb=(round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
                                        if device.type == "cuda" else None),
                           roofline_ms=float(f"{roof:.4g}"), roofline_ratio=float(f"{ms / roof:.3g}"),
                           weight_bytes=weights, kv_bytes=block.kv_bytes)
                forward = (forward_flops(block, built) if peak_flops and block.external_flops and block.first_step
                           else None)
                if forward:
                    floor = flop_floor_ms(forward, block.external_flops, workload.steps,
                                          VARIANT_NAMES[variant] in REUSING, peak_flops)
                    row.update(forward_tflop=float(f"{forward / 1e12:.4g}"), flop_floor_ms=float(f"{floor:.4g}"),
                               floor_ratio=float(f"{ms / max(floor, roof):.3g}"))
                if variant in FBCOMPILE_VARIANTS:  # what the timed blocks did: 1 refresh per block in block mode
                    counts = stats(model)
                    row.update(refreshes_per_block=round(counts.refreshes / (repeats + 2), 2),
                               reuses_per_block=round(counts.reuses / (repeats + 2), 2))
                    if counts.uncompiled:  # timed, but not what a working install runs
                        row.update(uncompiled_graphs=counts.uncompiled)
                    if counts.cuda_graphs:  # graphs replayed per block, and captures in all
                        row.update(replays_per_block=round(counts.cuda_graphs.get("replays", 0) / (repeats + 2), 2),
                                   captures=counts.cuda_graphs.get("captures", 0))
                if block.first_step is not None:
                    row.update(rel_err_vs_eager=float(f"{first_step_error(block, model, built, before):.2g}"))
            except torch.OutOfMemoryError as error:
                row.update(skipped=f"out of memory: {str(error).splitlines()[0][:80]}")
            finally:
                block = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            if progress is not None:  # each row as it ends, so that a run cut off keeps what it measured
                progress.write(json.dumps(row), file=sys.stderr)
                progress.update(1)
        model = before = None  # freed before the next batch's copy (its CUDA graphs' memory too: cycles)
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def first_step_error(block: Block, model: torch.nn.Module, eager: torch.nn.Module, before: Callable[[], None]) -> float:
    """Relative L2 error of ``model``'s first-step output against the eager model's (a new request: the
    first step refreshes, so every variant is exact there)."""
    before()
    torch.compiler.cudagraph_mark_step_begin()
    got = block.first_step(model).float()
    expected = block.first_step(eager).float()
    return ((got - expected).norm() / expected.norm()).item()


def resolve_bandwidth(value: str, device: torch.device) -> tuple[float, str]:
    """``auto`` (the datasheet value of the GPU it runs on, else H100's), ``h100``, ``h200``, or bytes/s."""
    if value == "auto":
        name = torch.cuda.get_device_name(device).lower() if device.type == "cuda" else ""
        key = next((k for k in BANDWIDTHS if k in name), "h100")
        note = "" if key in name else " (assumed: no datasheet value for this device)"
        return BANDWIDTHS[key], f"{key.upper()} datasheet, {BANDWIDTHS[key] / 1e12:.2f} TB/s{note}"
    if value.lower() in BANDWIDTHS:
        return BANDWIDTHS[value.lower()], f"{value.upper()} datasheet, {BANDWIDTHS[value.lower()] / 1e12:.2f} TB/s"
    rate = _rate(value, "--bandwidth", "auto, h100, h200 or bytes/s")
    return rate, f"{rate / 1e12:.3g} TB/s (given)"


def _rate(value: str, option: str, choices: str) -> float:
    """A rate given as a number on the command line; anything else stops with the option's choices."""
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"{option} takes {choices}; got {value!r}") from None


def resolve_peak_flops(value: str, device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """``auto`` (the datasheet bf16/fp16 rate of the H100/H200 it runs on, for those dtypes; else no FLOP
    floor), ``none``, or FLOP/s."""
    if value == "none":
        return None, "none"
    if value != "auto":
        rate = _rate(value, "--peak-flops", "auto, none or FLOP/s")
        return rate, f"{rate / 1e12:.4g} TFLOP/s (given)"
    name = torch.cuda.get_device_name(device).lower() if device.type == "cuda" else ""
    key = next((k for k in PEAK_FLOPS if k in name), None)
    if key is None or dtype not in (torch.bfloat16, torch.float16):
        return None, "none (no datasheet rate for this device and dtype)"
    return PEAK_FLOPS[key], f"{key.upper()} datasheet, {PEAK_FLOPS[key] / 1e12:.0f} TFLOP/s dense bf16"


def environment(device: torch.device, bandwidth_note: str, args: argparse.Namespace,
                peak_flops_note: str = "none") -> dict:
    """Device, versions and the command, for the results files."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return dict(device=name, torch=torch.__version__, triton=triton_version,
                python=platform.python_version(), bandwidth=bandwidth_note, peak_flops=peak_flops_note,
                dtype=args.dtype, compiler=args.compiler, config=args.config, repeats=args.repeats,
                command="python " + " ".join(sys.argv))


def _config_options(items: Sequence[str]) -> dict:
    """``["group_linears=False", ...]`` as Config fields (values are Python literals); checked by Config."""
    options = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--config takes FIELD=VALUE, got {item!r}")
        try:
            options[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[field] = value
    try:
        Config(**options)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"--config: {error}")
    return options


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(out: str, results: Mapping[str, dict], env: dict) -> list[str]:
    """``e2e.json``, ``e2e.md`` (a table per model) and one ``e2e_<model>.png`` per model (when
    matplotlib, a test extra, is installed); returns the paths written."""
    from tabulate import tabulate
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "e2e.json"), os.path.join(out, "e2e.md")]
    with open(paths[0], "w") as f:
        json.dump(dict(env=env, models=results), f, indent=1)
    lines = ["# End to end: ms per block per variant, against the memory roofline", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    for name, result in results.items():
        lines += [f"## {name}: {result['description']}", "",
                  tabulate(result["rows"], headers="keys", tablefmt="github"), ""]
    with open(paths[1], "w") as f:
        f.write("\n".join(lines))
    try:
        import matplotlib
    except ImportError:
        return paths
    matplotlib.use("Agg")
    for name, result in results.items():
        paths.append(_plot(os.path.join(out, f"e2e_{name}.png"), name, result["rows"], env.get("device", "device unknown")))
    return paths


def _plot(path: str, name: str, rows: list[dict], device: str) -> str:
    import matplotlib.pyplot as plt
    fig, (ms_ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    done = [r for r in rows if "ms_per_block" in r]
    variants = list(dict.fromkeys(r["variant"] for r in done))
    batches = sorted({r["batch"] for r in done})
    styles = ("-", "--", ":", "-.")  # per batch; one colour per variant
    for (variant, batch) in dict.fromkeys((r["variant"], r["batch"]) for r in done):
        mine = [r for r in done if r["variant"] == variant and r["batch"] == batch]
        xs = [r["context"] for r in mine]
        style = dict(marker="o", color=plt.get_cmap("tab10")(variants.index(variant) % 10),
                     linestyle=styles[batches.index(batch) % len(styles)], label=f"{variant}, batch {batch}")
        ms_ax.plot(xs, [r["ms_per_block"] for r in mine], **style)
        ratio_ax.plot(xs, [r["roofline_ratio"] for r in mine], **style)
    for (batch, reuse) in dict.fromkeys((r["batch"], r["variant"] in REUSING) for r in done):
        roof = {r["context"]: r["roofline_ms"] for r in done
                if r["batch"] == batch and (r["variant"] in REUSING) == reuse}
        ms_ax.plot(list(roof), list(roof.values()), linestyle=styles[batches.index(batch) % len(styles)],
                   color="gray" if reuse else "black", linewidth=2.5, alpha=0.6,
                   label=f"roofline {'block' if reuse else 'exact'}, batch {batch}")
    for ax, ylabel in ((ms_ax, "ms per block"), (ratio_ax, "measured / roofline")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1024:g}K" if x >= 1024 else f"{x:g}")
        ax.set_yscale("log")
        ax.set_xlabel("cached tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ratio_ax.axhline(1.0, color="black", linewidth=0.8)
    fig.legend(*ms_ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle(f"{name} on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Description": f"{name} on {device}"})
    plt.close(fig)
    return path


def _ints(text: str) -> list[int]:
    return [int(v[:-1]) * 1024 if v.lower().endswith("k") else int(v) for v in text.split(",")]


def parser(prog: str | None = None, add_help: bool = True) -> argparse.ArgumentParser:
    """The benchmark's options (also those of ``python -m fbcompile bench``)."""
    p = argparse.ArgumentParser(prog=prog, description="End-to-end ms per block per variant, vs the roofline.",
                                add_help=add_help)
    p.add_argument("--model", default=None, help="comma-separated workload names (default: all)")
    p.add_argument("--contexts", default="8k,32k,64k,128k", help="cached tokens, e.g. 8k,32k")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per row (the median is reported)")
    p.add_argument("--bandwidth", default="auto", help="auto, h100, h200, or bytes/s")
    p.add_argument("--peak-flops", default="auto", help="auto (H100/H200 datasheet bf16 rate), none, or FLOP/s: "
                   "the FLOP floor's rate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on the GPU, float32 on the CPU")
    p.add_argument("--compiler", default="inductor", help="fbcompile's graph compiler (inductor or eager)")
    p.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                   help="a further fbcompile.Config field for the fbcompile variants, e.g. group_linears=False")
    p.add_argument("--tiny", action="store_true", help="the workloads' small shapes (CPU, tests)")
    p.add_argument("--isolate", action="store_true",
                   help="each row in a process of its own with fresh Inductor and Triton caches (needs "
                        "--workloads): nothing compiled, captured or allocated carries over between rows, and "
                        "every first call compiles cold")
    p.add_argument("--out", default="benchmarks/results/e2e")
    return p


def main(make_workloads: Callable[[bool], Mapping[str, Workload]], argv: Sequence[str] | None = None,
         prog: str | None = None) -> dict:
    """Run every chosen workload x variant x batch x context; write the results; return them.
    ``make_workloads(tiny)`` returns the workloads by name."""
    args = parser(prog).parse_args(argv)
    return run(make_workloads(args.tiny), args)


def run(workloads: Mapping[str, Workload], args: argparse.Namespace) -> dict:
    """:func:`main` after parsing (the ``python -m fbcompile bench`` entry point shares it)."""
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    names = args.model.split(",") if args.model else list(workloads)
    unknown = [n for n in names if n not in workloads]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(workloads)}")
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {VARIANTS}")
    contexts, batches = sorted(_ints(args.contexts)), sorted(_ints(args.batches))
    options = _config_options(args.config)
    if getattr(args, "isolate", False):
        # Checked here, resolved by the children: this process never initializes the GPU, so no context of
        # its own sits beside theirs.
        resolve_bandwidth(args.bandwidth, torch.device("cpu"))
        resolve_peak_flops(args.peak_flops, torch.device("cpu"), dtype)
        return run_isolated(workloads, args, names, variants, contexts, batches)
    bandwidth, note = resolve_bandwidth(args.bandwidth, device)
    peak_flops, peak_note = resolve_peak_flops(args.peak_flops, device, dtype)
    env = environment(device, note, args, peak_note)
    results = {}
    total = len(names) * len(variants) * len(contexts) * len(batches)
    progress = _progress(total)
    with torch.no_grad():
        for name in names:
            w = workloads[name]
            progress.set_description(f"{name} building")
            built = w.build(device, dtype)  # once: random init of a billion weights takes seconds
            rows = []
            for variant in variants:
                progress.set_description(f"{name} {variant}")
                rows += bench_variant(w, built, variant, contexts, batches, device=device, repeats=args.repeats,
                                      bandwidth=bandwidth, compiler=args.compiler, options=options,
                                      progress=progress, peak_flops=peak_flops)
                results[name] = dict(description=w.description, steps=w.steps, block_size=w.block_size,
                                     unit=w.unit, rows=rows)
                paths = write_results(args.out, results, env)  # after each variant: a cut-off run keeps its rows
            del built
    progress.close()
    print("\n".join(f"written {p}" for p in paths))
    return results


def run_isolated(workloads: Mapping[str, Workload], args: argparse.Namespace, names: Sequence[str],
                 variants: Sequence[str], contexts: Sequence[int], batches: Sequence[int]) -> dict:
    """:func:`run`'s rows, each from a ``python -m fbcompile bench`` process of its own with empty Inductor
    and Triton cache directories (in the order :func:`run` takes them). In one process a row inherits the
    rows before it: their compiled code (a warm first call), the allocator's cached blocks and
    fragmentation, dynamo's state. A row whose process fails is recorded with the end of its error output.
    The device, versions and rates in the results are those the first child that succeeds resolved; the
    command is this one."""
    import subprocess
    import tempfile
    if not getattr(args, "workloads", None):
        raise SystemExit("--isolate runs each row as `python -m fbcompile bench --workloads MODULE:CALLABLE`; "
                         "give --workloads")
    shared = ["--workloads", args.workloads, "--repeats", str(args.repeats), "--bandwidth", args.bandwidth,
              "--peak-flops", args.peak_flops, "--device", args.device, "--dtype", args.dtype,
              "--compiler", args.compiler] + [f"--config={item}" for item in args.config] + ["--tiny"] * args.tiny
    isolated = dict(command="python " + " ".join(sys.argv),
                    isolated="each row its own process, with empty Inductor and Triton caches")
    env = dict(isolated)
    results: dict = {}
    progress = _progress(len(names) * len(variants) * len(contexts) * len(batches))
    for name in names:
        w = workloads[name]
        results[name] = dict(description=w.description, steps=w.steps, block_size=w.block_size, unit=w.unit, rows=[])
        for variant in variants:
            for batch in batches:
                for context in contexts:
                    progress.set_description(f"{name} {variant} batch {batch} context {context}")
                    with tempfile.TemporaryDirectory(prefix="fbcompile_bench_") as tmp:
                        cmd = [sys.executable, "-m", "fbcompile", "bench", *shared, "--model", name, "--variants",
                               variant, "--contexts", str(context), "--batches", str(batch),
                               "--out", os.path.join(tmp, "out")]
                        child_env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                                         TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
                        done = subprocess.run(cmd, env=child_env, capture_output=True, text=True)
                        result = os.path.join(tmp, "out", "e2e.json")
                        if done.returncode == 0 and os.path.exists(result):
                            with open(result) as f:
                                child = json.load(f)
                            rows = child["models"][name]["rows"]
                            if "device" not in env:
                                env = dict(child["env"], **isolated)
                        else:
                            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                            rows = [dict(variant=VARIANT_NAMES[variant], context=context, batch=batch,
                                         error=f"exit {done.returncode}: {tail[0][:200]}")]
                    results[name]["rows"] += rows
                    paths = write_results(args.out, results, env)
                    for row in rows:
                        progress.write(json.dumps(row), file=sys.stderr)
                    progress.update(1)
    progress.close()
    print("\n".join(f"written {p}" for p in paths))
    return results


def _progress(total: int):
    from tqdm import tqdm  # comes with transformers, a dependency
    return tqdm(total=total, unit="row", file=sys.stderr)
