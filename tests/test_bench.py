"""The end-to-end benchmark harness (fbcompile.bench + benchmarks/e2e.py) at tiny shapes on the CPU.
Nothing is timed here: the checks are the files, the roofline arithmetic and the CLI."""
from __future__ import annotations

import json
import math
import os
import sys
import weakref

import pytest
import torch

from fbcompile import bench
from fbcompile.__main__ import main as cli

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.e2e import TINY_LM, TINY_WAN, workloads  # noqa: E402


def test_roofline_matches_the_issue_hand_computation():
    # Qwen2-1.5B shape on the H100 (issue 13): 2.72 GB of weights, 32K cached tokens of 28 layers x
    # 2 (k, v) x 2 KV heads x 128 x bf16 = 0.94 GB; 8 steps: exact 8.7 ms, block 6.8 ms.
    kv = 28 * 2 * 2 * 32768 * 128 * 2
    assert kv == 939_524_096
    exact = bench.roofline_ms(2.72e9, kv, 8, reuse=False, bandwidth=3.35e12)
    block = bench.roofline_ms(2.72e9, kv, 8, reuse=True, bandwidth=3.35e12)
    assert math.isclose(exact, 8 * (2.72e9 + kv) / 3.35e12 * 1e3) and round(exact, 1) == 8.7
    assert math.isclose(block, (8 * 2.72e9 + kv) / 3.35e12 * 1e3) and round(block, 1) == 6.8


def test_weight_bytes_leaves_out_gathered_embeddings_but_counts_a_tied_head_once():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 100, bias=False))
    assert bench.weight_bytes(model) == (8 * 4 + 4 + 8 * 100) * 4
    model[2].weight = model[0].weight  # a tied LM head reads the whole table
    assert bench.weight_bytes(model) == (8 * 4 + 4 + 100 * 8) * 4
    assert bench.weight_bytes(model, exclude=("1",)) == 100 * 8 * 4


def test_a_row_that_does_not_fit_is_recorded_as_skipped():
    def prepare(model, context, batch):
        if context > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return bench.Block(lambda: model(torch.ones(batch, 4)), kv_bytes=0)
    workload = bench.Workload(lambda device, dtype: torch.nn.Linear(4, 4), prepare, steps=2, block_size=4)
    rows = bench.bench_variant(workload, torch.nn.Linear(4, 4), "eager", [16, 32], [1], device=torch.device("cpu"),
                               repeats=1, bandwidth=1e12, compiler="eager")
    assert "ms_per_block" in rows[0] and "skipped" not in rows[0]
    assert rows[1]["skipped"].startswith("out of memory") and "ms_per_block" not in rows[1]


def test_each_batch_is_compiled_with_its_batch_static(monkeypatch):
    """A server at a fixed batch compiles for that batch: through one compiled model the second batch
    would be recompiled with the batch dynamic, which fbcompile's linear passes leave to cuBLAS."""
    dynamic = []

    def recording(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
        dynamic.append(any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor)
                                                            and any(isinstance(d, torch.SymInt) for d in v.shape))
                           for v in values))
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend=recording))
    workload = bench.Workload(lambda device, dtype: torch.nn.Linear(4, 4),
                              lambda model, context, batch: bench.Block(lambda: model(torch.ones(batch, 4)), 0),
                              steps=2, block_size=4)
    torch._dynamo.reset()
    rows = bench.bench_variant(workload, torch.nn.Linear(4, 4), "compile", [16], [2, 3], device=torch.device("cpu"),
                               repeats=1, bandwidth=1e12, compiler="eager")
    assert [r["batch"] for r in rows] == [2, 3] and all("ms_per_block" in r for r in rows)
    assert dynamic == [False, False]


def test_a_batch_model_is_freed_before_the_next_batch_is_prepared():
    """Each batch compiles its own copy; the last one (its CUDA graphs and their memory) must be gone
    when the next, larger batch allocates, or the largest rows run short of memory (66 against 36 GB
    at 128K / batch 8 on the H100 before it was collected)."""
    lm = workloads(tiny=True)["lm"]
    alive = []

    def prepare(model, context, batch):
        alive.append([ref() is not None for ref in refs])
        refs.append(weakref.ref(model))
        return lm.prepare(model, context, batch)

    refs = []
    workload = bench.Workload(lm.build, prepare, steps=lm.steps, block_size=lm.block_size)
    built = lm.build(torch.device("cpu"), torch.float32)
    bench.bench_variant(workload, built, "block", [64], [1, 2], device=torch.device("cpu"), repeats=1,
                        bandwidth=1e12, compiler="eager")
    assert alive == [[], [False]]


def test_cli_runs_the_tiny_lm_in_two_variants_and_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "e2e"
    assert cli(["bench", "--workloads", "benchmarks.e2e:workloads", "--tiny", "--model", "lm", "--contexts", "64",
                "--batches", "1", "--variants", "eager,block", "--compiler", "eager", "--device", "cpu",
                "--repeats", "1", "--bandwidth", "1e9", "--peak-flops", "1e9", "--out", str(out)]) == 0
    result = json.loads((out / "e2e.json").read_text())
    assert result["env"]["bandwidth"] == "0.001 TB/s (given)" and result["env"]["peak_flops"] == "0.001 TFLOP/s (given)"
    rows = result["models"]["lm"]["rows"]
    assert [r["variant"] for r in rows] == ["eager", "fbcompile block"]
    # hand count of the tiny LM's fp32 parameters, the embedding table left out
    h, layers, kv_dim, ff, vocab = 64, TINY_LM["num_layers"], 2 * 16, 128, 256
    per_layer = (h * h + h) + 2 * (h * kv_dim + kv_dim) + h * h + 2 * h + 3 * h * ff
    weights = (layers * per_layer + h + h * vocab) * 4
    kv = layers * 2 * 1 * 2 * 64 * 16 * 4
    steps = workloads(tiny=True)["lm"].steps
    for row, reuse in zip(rows, (False, True)):
        assert row["weight_bytes"] == weights and row["kv_bytes"] == kv
        roofline = (steps * weights + (kv if reuse else steps * kv)) / 1e9 * 1e3
        assert row["roofline_ms"] == pytest.approx(roofline, rel=1e-3)
        assert row["roofline_ratio"] == pytest.approx(row["ms_per_block"] / row["roofline_ms"], rel=1e-2)
        assert row["tokens_per_s"] > 0 and row["peak_mem_gb"] is None
        # the FLOP floor: the external attention (4 x heads x block x cached keys x head dim x layers) once
        # per block in block mode; the forward's count covers it and the block's attention over itself
        external = 4 * TINY_LM["num_heads"] * TINY_LM["block_size"] * 64 * 16 * layers
        forward = row["forward_tflop"] * 1e12
        assert external < forward and row["flop_floor_ms"] == pytest.approx(
            (steps * forward - ((steps - 1) * external if reuse else 0)) / 1e9 * 1e3, rel=1e-3)
        assert row["floor_ratio"] == pytest.approx(
            row["ms_per_block"] / max(row["flop_floor_ms"], row["roofline_ms"]), rel=1e-2)
    assert rows[1]["refreshes_per_block"] == 1 and rows[1]["reuses_per_block"] == steps - 1  # a new block each time
    assert rows[0]["rel_err_vs_eager"] == 0 and rows[1]["rel_err_vs_eager"] < 1e-5  # the first step refreshes
    table = (out / "e2e.md").read_text()
    assert "fbcompile block" in table and f"- torch: {torch.__version__}" in table
    assert (out / "e2e_lm.png").stat().st_size > 1000


def test_tiny_video_has_a_flop_floor_and_gemma_none(tmp_path):
    """The video, Wan and DiffusionGemma workloads run through the harness at tiny shapes; the video DiTs
    state their external attention's FLOPs (a floor row), DiffusionGemma (layers of several head shapes)
    does not. Wan's rolling cache rolls at every block, which refreshes once per layer (LongLive's deferred
    write rolls the real cache as the first step rolled the clone: the later steps reuse)."""
    models = {}
    for names, variants in (("video,gemma", "eager"), ("wan", "eager,block")):
        out = tmp_path / names
        assert cli(["bench", "--workloads", "benchmarks.e2e:workloads", "--tiny", "--model", names, "--contexts",
                    "64", "--batches", "1", "--variants", variants, "--compiler", "eager", "--device", "cpu",
                    "--repeats", "1", "--bandwidth", "1e9", "--peak-flops", "1e9", "--out", str(out)]) == 0
        models.update(json.loads((out / "e2e.json").read_text())["models"])
    video, gemma, wan = (models[name]["rows"][0] for name in ("video", "gemma", "wan"))
    for row, name in ((video, "video"), (wan, "wan")):  # eager: the external part at every step
        assert row["flop_floor_ms"] == pytest.approx(workloads(tiny=True)[name].steps * row["forward_tflop"] * 1e12
                                                     / 1e9 * 1e3, rel=1e-3)
    assert "flop_floor_ms" not in gemma and gemma["ms_per_block"] > 0
    layers, steps = TINY_WAN["num_layers"], workloads(tiny=True)["wan"].steps
    block = next(row for row in models["wan"]["rows"] if row["variant"] == "fbcompile block")
    assert (block["refreshes_per_block"], block["reuses_per_block"]) == (layers, layers * (steps - 1)), block
    assert block["rel_err_vs_eager"] < 1e-5  # the first step refreshes: exact


def test_flop_floor_rate_is_the_datasheet_only_where_known():
    cpu = torch.device("cpu")
    assert bench.resolve_peak_flops("auto", cpu, torch.bfloat16)[0] is None
    assert bench.resolve_peak_flops("none", cpu, torch.bfloat16) == (None, "none")
    assert bench.resolve_peak_flops("2e12", cpu, torch.float32)[0] == 2e12
    assert bench.flop_floor_ms(10e12, 4e12, 8, reuse=True, peak=1e15) == pytest.approx((80 - 28) / 1e3 * 1e3)
    assert bench.flop_floor_ms(10e12, 4e12, 8, reuse=False, peak=1e15) == pytest.approx(80.0)


def test_config_options_parsed_and_checked():
    assert bench._config_options(["group_linears=False", "refresh=2"]) == {"group_linears": False, "refresh": 2}
    for bad in (["group_linears"], ["group_linears=maybe"], ["no_such_field=1"]):
        with pytest.raises(SystemExit):
            bench._config_options(bad)


def test_merge_keeps_only_the_variants_a_run_is_given_with(tmp_path):
    """``benchmarks/merge_e2e.py``: ``PATH:VARIANTS`` takes those variants' rows of that run, a bare path all."""
    from benchmarks.merge_e2e import merge

    def run(name, variants):
        rows = [dict(variant=bench.VARIANT_NAMES[v], context=32768, batch=1, ms_per_block=float(i))
                for i, v in enumerate(variants)]
        path = tmp_path / name
        path.write_text(json.dumps(dict(env=dict(device="D", command=name), models=dict(lm=dict(rows=rows)))))
        return str(path)

    new = run("new.json", ["exact-ro", "block-ro"])
    old = run("old.json", ["compile", "compile-ro", "exact-ro", "block-ro"])
    models, env = merge([new, old + ":compile,compile-ro"])
    assert [r["variant"] for r in models["lm"]["rows"]] == [
        "torch.compile", "torch.compile reduce-overhead", "fbcompile exact, CUDA graphs",
        "fbcompile block, CUDA graphs"]
    assert env["command"] == "new.json ; old.json"
    assert len(merge([new, old])[0]["lm"]["rows"]) == 6


TINY_ARGS = ["bench", "--workloads", "benchmarks.e2e:workloads", "--tiny", "--model", "lm", "--contexts", "64",
             "--compiler", "eager", "--device", "cpu", "--repeats", "1", "--bandwidth", "1e9", "--isolate"]


def test_isolate_runs_each_row_in_a_process_of_its_own_and_merges_their_rows(tmp_path, monkeypatch):
    """Two rows, two real child processes: the rows are those an in-process run writes, in its order."""
    out = tmp_path / "isolated"
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))  # the children import benchmarks.e2e from here
    assert cli(TINY_ARGS + ["--batches", "1", "--variants", "eager,block", "--out", str(out)]) == 0
    result = json.loads((out / "e2e.json").read_text())
    assert result["env"]["isolated"].startswith("each row its own process")
    rows = result["models"]["lm"]["rows"]
    assert [(r["variant"], r["context"], r["batch"]) for r in rows] == [("eager", 64, 1), ("fbcompile block", 64, 1)]
    assert all(r["ms_per_block"] > 0 and "error" not in r for r in rows)
    steps = workloads(tiny=True)["lm"].steps
    assert (rows[1]["refreshes_per_block"], rows[1]["reuses_per_block"]) == (1, steps - 1)
    assert rows[1]["rel_err_vs_eager"] < 1e-5


def test_isolate_gives_each_row_empty_caches_and_records_a_failed_row(tmp_path, monkeypatch):
    """Each child gets the row's options and cache directories of its own; a child that fails is a row with
    its exit status and last error line, and the rows after it still run."""
    import subprocess
    calls = []

    def fake_run(cmd, env, capture_output, text):
        calls.append((cmd, env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"]))
        if len(calls) == 1:
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nRuntimeError: boom")
        out = cmd[cmd.index("--out") + 1]
        os.makedirs(out)
        row = dict(variant="fbcompile exact", context=64, batch=int(cmd[cmd.index("--batches") + 1]), ms_per_block=1.0,
                   roofline_ms=0.5, roofline_ratio=2.0)
        with open(os.path.join(out, "e2e.json"), "w") as f:
            json.dump(dict(env={}, models=dict(lm=dict(rows=[row]))), f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "isolated"
    assert cli(TINY_ARGS + ["--batches", "1,2", "--variants", "exact", "--config", "group_linears=False",
                            "--out", str(out)]) == 0
    rows = json.loads((out / "e2e.json").read_text())["models"]["lm"]["rows"]
    assert rows[0] == dict(variant="fbcompile exact", context=64, batch=1, error="exit 1: RuntimeError: boom")
    assert rows[1]["batch"] == 2 and rows[1]["ms_per_block"] == 1.0
    assert len({c[1] for c in calls}) == len({c[2] for c in calls}) == 2  # fresh caches per row
    for cmd, _, _ in calls:
        assert cmd[1:4] == ["-m", "fbcompile", "bench"] and "--isolate" not in cmd and "--tiny" in cmd
        assert "--config=group_linears=False" in cmd and cmd[cmd.index("--variants") + 1] == "exact"


def test_isolate_leaves_the_gpu_to_the_children_and_takes_their_environment(tmp_path, monkeypatch):
    """With ``--device cuda`` the parent process never initializes CUDA (no context of its own beside each
    child's): the device, versions and rates in the results are the first successful child's, the command
    the parent's; before any child succeeds the results name no device."""
    import subprocess
    written = []
    out = tmp_path / "isolated"

    def fake_run(cmd, env, capture_output, text):
        if not written:
            written.append("failed")
            return subprocess.CompletedProcess(cmd, 1, "", "RuntimeError: no GPU")
        if len(written) == 1:  # the parent's results after the failed row
            written.append(sorted(json.loads((out / "e2e.json").read_text())["env"]))
        out_child = cmd[cmd.index("--out") + 1]
        os.makedirs(out_child)
        row = dict(variant="fbcompile block", context=64, batch=int(cmd[cmd.index("--batches") + 1]), ms_per_block=1.0,
                   roofline_ms=0.5, roofline_ratio=2.0)
        child_env = dict(device=f"GPU of child {len(written) - 1}", torch="x", bandwidth="H100 datasheet",
                         command="python -m fbcompile bench (child)")
        written.append(child_env["device"])
        with open(os.path.join(out_child, "e2e.json"), "w") as f:
            json.dump(dict(env=child_env, models=dict(lm=dict(rows=[row]))), f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def no_cuda(*args, **kwargs):
        raise AssertionError("the parent initialized CUDA")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", no_cuda)
    args = [a if a != "cpu" else "cuda" for a in TINY_ARGS]
    assert cli(args + ["--batches", "1,2,4", "--variants", "block", "--out", str(out)]) == 0
    env = json.loads((out / "e2e.json").read_text())["env"]
    assert env["device"] == "GPU of child 1" and env["bandwidth"] == "H100 datasheet"
    assert env["isolated"].startswith("each row its own process") and "(child)" not in env["command"]
    assert written == ["failed", ["command", "isolated"], "GPU of child 1", "GPU of child 2"]


def test_isolate_checks_its_options_before_any_child(tmp_path):
    with pytest.raises(SystemExit, match="--bandwidth takes auto, h100, h200 or bytes/s; got 'fast'"):
        cli(TINY_ARGS + ["--batches", "1", "--variants", "block", "--bandwidth", "fast", "--out", str(tmp_path)])


def test_isolate_needs_a_workloads_spec(tmp_path):
    with pytest.raises(SystemExit, match="--workloads"):
        bench.main(workloads, ["--tiny", "--model", "lm", "--contexts", "64", "--batches", "1", "--variants",
                               "eager", "--device", "cpu", "--isolate", "--out", str(tmp_path)])
