#!/bin/bash
# Device calls that check the GPU paths and measure what the CPU cannot: every file lands under $OUT (the
# device tool's output folder), each step under its own time limit, so a cut-off call keeps what
# finished. Usage on the device: bash benchmarks/device_session.sh STEP...  (default: tests grow)
#   tests       the GPU tests, each named as it ends: tests_graphs, then tests_kernels      (<= 860 s: more than
#               one device call may run; run the two steps in two calls)
#   tests_graphs  the CUDA-graph tests (tests/test_cuda_graphs.py: 112 tests, ~470 s on the H100 in the thirtieth
#               session, whose 420 s limit cut the last 11)                                  (<= 560 s)
#   tests_kernels the Triton kernels' tests: attention, sparse attention, linears            (<= 300 s)
#   tests_new   the GPU tests of what had not run on a GPU (the twenty-fourth session's): LongLive's deferred
#               write under CUDA graphs (SDPA, flash-attn's varlen kernel), ops on host inputs, frame sizes (<= 180 s)
#   grow        a cache grown by torch.cat per block vs the same tensors, block mode, 32K (<= 300 s)
#   grow_more   the grown cache in exact mode at 32K and in block mode at 128K            (<= 330 s)
#   wide        kernel table and tile sweep for head dims 256 and 512                   (<= 240 s)
#   lm_attention  kernel table and tile/split sweep for the LM's heads (12/2, D128) at 32 queries, 32K and 128K keys,
#               batch 1 and 8 (exact mode's external attention)                                        (<= 240 s)
#   gemma       DiffusionGemma end to end at 8K and 32K                                 (<= 480 s)
#   copy        ways to copy a new cache into spare capacity (benchmarks/spare_copy.py)  (<= 120 s)
#   masks       bool masks on the Triton kernels natively (passed as they are since f2f9ff6), then the two
#               mask forms at 32K grown, which ran graphs without Inductor on torch 2.11 before   (<= 420 s)
#   moving      the GPU tests of a moving cache with a mask over cache and block (passed in or built from the
#               length) or positions from its length                                               (<= 240 s)
#   forms       block mode at 32K grown with each of those forms: none, a mask passed in, positions from the
#               length, a mask the model builds from the length (benchmarks/grow_cache.py)          (<= 570 s)
#   linear      one layer's weight GEMMs at 32 and 256 rows: separate vs fused, cuBLAS vs autotuned (<= 300 s)
#   skinny      the skinny-GEMM kernel: config sweep per GEMM shape, then the layer (benchmarks/small_m_linear.py) (<= 480 s)
#   skinny_cases  config sweep of fbcompile's launches at 32 rows (qkv, gate+up stacked, gate+up gated), then the
#               layer grouped with and without the gated down projection                              (<= 300 s)
#   skinny_forms  the layer only: cuBLAS separate / fused vs the Triton kernel separate / grouped     (<= 150 s)
#   group       the LM's block and exact mode at 32K, batch 1, with and without grouped linears (Config.group_linears) (<= 600 s)
#   gated       the LM's block mode at 32K, batch 1, with and without Config.gated_linears; then the profile (<= 560 s)
#   residual    the linear and CUDA-graph GPU tests; the LM's block mode at 32K, batch 1, with and without
#               Config.residual_linears; the profile (<= 820 s)
#   partials    the LM's block mode at 32K, batch 1, with and without Config.linear_partials; the profile (<= 520 s)
#   tests_partials  the GPU tests of the linear passes, CUDA graphs and the attention kernels            (<= 360 s)
#   table_32k, table_128k  the README's H100 table at that context: torch.compile, exact and block mode with CUDA
#               graphs at batch 1 and 8, each row its own process (--isolate; 50-90 s a row on the H100) (<= 590 s)
#   vs_compile  the LM at 32K, batch 1: torch.compile default and reduce-overhead against fbcompile exact and block
#               mode with CUDA graphs, compile times included                                        (<= 450 s)
#   profile     where one block's time goes: block mode at 32K, batch 1, top 40 kernels (benchmarks/profile_block.py) (<= 240 s)
#   host        host time per forward, a block's refresh apart, with cProfile (block mode, 32K, batch 1); then
#               where one block's time goes at batch 8                                              (<= 480 s)
#   sparse      sparse attention kernels at tile 64 (fbcompile.Sparse's default), with the sweeps      (<= 150 s)
#   combo       the LM's block mode at 32K, batch 1, with and without Config.combo_kernels            (<= 400 s)
#   video       the 1.3B video DiT end to end at 8K and 32K cached tokens: torch.compile, exact, block  (<= 420 s)
#   video_32k   the same at 32K, fbcompile exact and block mode with and without CUDA graphs         (<= 420 s)
#   wan         Wan-1.3B as LongLive runs it (rolling cache, CPU grid_sizes) at 32K: eager, torch.compile,
#               fbcompile exact and block with CUDA graphs                                          (<= 560 s)
#   wan_profile where one chunk of that Wan-1.3B run goes: torch.compile, fbcompile exact and block with CUDA
#               graphs, top 30 kernels each and the 16 host ops with the most GPU time by input shapes
#               (benchmarks/profile_block.py; the twenty-seventh session's run left ~45 ms per chunk of
#               foreach input copies unexplained)                                                      (<= 420 s)
#   wan_host    host time per forward of that Wan-1.3B run, block and exact mode with CUDA graphs: sections and
#               cProfile (benchmarks/profile_block.py --host; the twenty-eighth session's run found the host
#               waiting on two .item() syncs per layer and ~59 µs per replay)                      (<= 300 s)
#   backends    fbcompile's external-attention kernel against PyTorch's flash and cuDNN attention (with LSE) and
#               SDPA, over 64-4680 queries per head (benchmarks/attention_backends.py), then at the video's
#               [B, S, H, D] layout                                                                   (<= 220 s)
#   cudnn       the cuDNN path's GPU tests (the ops, the video DiT with and without CUDA graphs)      (<= 200 s)
#   llada       the GPU tests of RoPE after the cat over a moving cache; then Fast-dLLM's LLaDA generation (OLMo form,
#               8 layers of LLaDA-8B, prompt 2048, 256 tokens, prefix cache): eager, torch.compile, fbcompile
#               exact/block with and without CUDA graphs (benchmarks/llada_generate.py)              (<= 560 s)
#   dream       the GPU tests of RoPE after the cat (HF tables by a matmul too); then Fast-dLLM's Dream generation (8
#               layers of Dream-7B, prompt 2048, 256 tokens, prefix cache): eager, torch.compile, fbcompile exact/block
#               with CUDA graphs (benchmarks/llada_generate.py --model dream); the query-length bucket test (<= 560 s)
#   first       where Dream's first generate goes (4 layers; exact and block mode with CUDA graphs, then
#               torch.compile): graphs compiled, dynamo's and Inductor's phases (benchmarks/first_call.py) (<= 420 s)
#   tune        the linear launches of a layer (q/k/v, o, down as partials; gate/up gated) over configs with
#               warps and 5-7 splits, each against a read-only launch of its bytes (the ceiling)       (<= 560 s)
set -u
OUT=${OUT:-benchmarks/results/device_session}
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.txt with its exit status
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "rc=$?" >> "$OUT/$name.txt"
}
on_off() {  # on_off ON_NAME OFF_NAME CONFIG_FLAG VARIANTS SECONDS: the LM at 32K, batch 1, with the flag on and off
    local on=$1 off=$2 flag=$3 variants=$4 limit=$5
    step "$on" "$limit" python -m fbcompile bench --workloads benchmarks.e2e:workloads --model lm \
        --contexts 32k --batches 1 --variants "$variants" --repeats 10 --out "$OUT/$on"
    step "$off" "$limit" python -m fbcompile bench --workloads benchmarks.e2e:workloads --model lm \
        --contexts 32k --batches 1 --variants "$variants" --repeats 10 --config "$flag=False" --out "$OUT/$off"
}
profile() {  # profile SECONDS: where one block's time goes, block mode at 32K, batch 1
    step profile_32k_b1 "$1" python benchmarks/profile_block.py --model lm --context 32k --batch 1 \
        --variants block-ro --top 40 --sequence 120 --gaps 20 --out "$OUT/profile_lm_32k_b1"
}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests grow)
for name in "${steps[@]}"; do
    case $name in
    tests|tests_graphs|tests_kernels)
        [ "$name" != tests_kernels ] && step tests_graphs 560 python -m pytest -v --tb=short -p no:cacheprovider \
            -p no:logging tests/test_cuda_graphs.py
        [ "$name" != tests_graphs ] && step tests_kernels 300 python -m pytest -v --tb=short -p no:cacheprovider \
            -p no:logging tests/test_triton_kernels.py tests/test_sparse_kernels.py tests/test_triton_linear.py \
            tests/test_group_linears.py tests/test_gated_linears.py ;;
    tests_new) step tests_new 180 python -m pytest -v --tb=short -p no:cacheprovider -p no:logging \
        tests/test_cuda_graphs.py tests/test_host_island.py -k "longlive or host or frame_positions" ;;
    grow) step grow_32k 300 python benchmarks/grow_cache.py --context 32k --variants block-ro --warmup 4 \
        --blocks 3 --out "$OUT/grow_32k.json" ;;
    grow_more)
        step grow_32k_exact 170 python benchmarks/grow_cache.py --context 32k --variants exact-ro --settings grown \
            --warmup 4 --blocks 3 --out "$OUT/grow_32k_exact.json"
        step grow_128k 160 python benchmarks/grow_cache.py --context 128k --variants block-ro --settings grown \
            --warmup 4 --blocks 3 --out "$OUT/grow_128k.json" ;;
    wide) step wide 240 env PYTHONPATH=. python benchmarks/attention.py --out "$OUT" --heads 8/4/256,8/4/512 --sweep ;;
    lm_attention) for b in 1 8; do
            step "lm_attention_b$b" 120 env PYTHONPATH=. python benchmarks/attention.py --out "$OUT/lm_b$b" \
                --heads 12/2/128 --blocks 32 --keys 32768,131072 --batch "$b" --sweep --sweep-keys 32768,131072
        done ;;
    gemma) step e2e_gemma 480 python -m fbcompile bench --workloads benchmarks.e2e:workloads --model gemma \
        --contexts 8k,32k --batches 1 --variants compile,exact-ro,block-ro --repeats 3 --out "$OUT/e2e_gemma" ;;
    backends) step attention_backends 120 env PYTHONPATH=. python benchmarks/attention_backends.py \
        --out "$OUT/attention_backends.json"
        step attention_backends_bshd 100 env PYTHONPATH=. python benchmarks/attention_backends.py --layout bshd \
            --rows 256,1024,4096,4680 --out "$OUT/attention_backends_bshd.json" ;;
    cudnn) step tests_cudnn 200 python -m pytest -q -p no:cacheprovider -p no:logging --tb=long tests/test_ops.py \
        tests/test_cuda_graphs.py -k cudnn ;;
    tune)
        step split_tune 340 env PYTHONPATH=. python benchmarks/split_linears.py --parts gemm --cases qkv,o,down \
            --grid "block_n=32,64 block_k=64,128 splits=2,4,5,6,7 num_warps=4,8" --out "$OUT/split_tune.json"
        step gated_tune 220 env PYTHONPATH=. python benchmarks/small_m_linear.py --rows 32 --sweep \
            --sweep-cases gate+up-gated --forms triton-gated --out "$OUT/gated_tune.json" \
            --grid "block_n=32,64 block_k=32,64,128 split_k=1 num_warps=4,8 num_stages=4,5,6" ;;
    moving)  # the forms a moving cache replays from spare capacity with: a mask over cache and block, positions
        step tests_moving 240 python -m pytest -q -p no:cacheprovider -p no:logging --tb=long tests/test_cuda_graphs.py \
            -k "mask_over or positions_from or video_frame or crop_loop or read_elsewhere or sdar or built_from_the_cached" ;;
    forms)  # the built mask is HF's create_causal_mask form, computed at the capacity
        step grow_forms 570 python benchmarks/grow_cache.py --context 32k --variants block-ro \
            --settings grown,grown-mask,grown-positions,grown-built-mask --warmup 4 --blocks 3 \
            --out "$OUT/grow_forms.json" ;;
    llada)
        step tests_rope_after_cat 120 python -m pytest -q -p no:cacheprovider -p no:logging tests/test_cuda_graphs.py \
            -k "rope_after_the_cat or olmo"
        step llada_generate 440 python benchmarks/llada_generate.py --prompt 2048 --gen 256 --steps 8 --layers 8 \
            --repeats 3 --out "$OUT/llada_generate.json" ;;
    dream)
        step tests_rope_after_cat 120 python -m pytest -q -p no:cacheprovider -p no:logging tests/test_cuda_graphs.py \
            tests/test_ops.py -k "rope_after_the_cat or olmo or dream or query_lengths"
        step dream_generate 440 python benchmarks/llada_generate.py --model dream --prompt 2048 --gen 256 --steps 8 \
            --layers 8 --variants eager,compile,exact-cg,block-cg --repeats 4 --out "$OUT/dream_generate.json" ;;
    first) for variant in exact-cg block-cg compile; do
            step "first_$variant" 140 python benchmarks/first_call.py --model dream --layers 4 --variant $variant --top 0
        done ;;
    copy) step spare_copy 120 python benchmarks/spare_copy.py --out "$OUT/spare_copy.json" ;;
    masks)
        step tests_bool_masks 120 python -m pytest -q -p no:cacheprovider -p no:logging tests/test_triton_kernels.py \
            -k "bool or sliding or empty_rows or bcast"
        step grow_masks 300 python benchmarks/grow_cache.py --context 32k --variants block-ro \
            --settings grown-mask,grown-built-mask --warmup 4 --blocks 3 --out "$OUT/grow_masks.json" ;;
    linear) step small_m_linear 300 python benchmarks/small_m_linear.py --rows 32,256 --out "$OUT/small_m_linear.json" ;;
    skinny) step skinny_linear 480 env PYTHONPATH=. python benchmarks/small_m_linear.py --rows 32,256 --sweep \
        --forms separate,fused,triton,triton-best --out "$OUT/skinny_linear.json" ;;
    skinny_cases) step skinny_cases 300 env PYTHONPATH=. python benchmarks/small_m_linear.py --rows 32 --sweep \
        --sweep-cases qkv,gate+up,down,gate+up-gated --forms separate,triton-grouped,triton-gated \
        --out "$OUT/skinny_cases.json" ;;
    skinny_forms) step skinny_forms 150 env PYTHONPATH=. python benchmarks/small_m_linear.py --rows 32,256 \
        --forms separate,fused,triton,triton-grouped --out "$OUT/skinny_forms.json" ;;
    group) on_off lm_32k_b1_grouped lm_32k_b1_separate group_linears block-ro,exact-ro 300 ;;
    gated) on_off lm_32k_b1_gated lm_32k_b1_ungated gated_linears block-ro 200
        profile 160 ;;
    residual)
        step tests_linear 300 python -m pytest -q -p no:cacheprovider -p no:logging tests/test_triton_linear.py \
            tests/test_residual_linears.py tests/test_gated_linears.py tests/test_group_linears.py tests/test_cuda_graphs.py
        on_off lm_32k_b1_residual lm_32k_b1_no_residual residual_linears block-ro 200
        profile 150 ;;
    partials) on_off lm_32k_b1_partials lm_32k_b1_no_partials linear_partials block-ro 200
        profile 150 ;;
    tests_partials) step tests_partials 360 python -m pytest -q -p no:cacheprovider -p no:logging \
        tests/test_linear_partials.py tests/test_triton_linear.py tests/test_residual_linears.py tests/test_cuda_graphs.py \
        tests/test_triton_kernels.py tests/test_sparse_kernels.py ;;
    table_32k|table_128k) step "e2e_lm_$name" 590 python -m fbcompile bench --workloads benchmarks.e2e:workloads \
        --model lm --contexts "${name#table_}" --batches 1,8 --variants compile,exact-ro,block-ro --repeats 5 \
        --isolate --out "$OUT/e2e_lm_$name" ;;
    vs_compile) step e2e_lm_vs_compile 450 python -m fbcompile bench --workloads benchmarks.e2e:workloads \
        --model lm --contexts 32k --batches 1 --variants compile,compile-ro,exact-ro,block-ro --repeats 3 \
        --out "$OUT/e2e_lm_vs_compile" ;;
    profile) profile 240 ;;
    host)
        step host_32k_b1 240 python benchmarks/profile_block.py --model lm --context 32k --batch 1 --variants block-ro \
            --host 10 --top 40 --out "$OUT/host_lm_32k_b1"
        step profile_32k_b8 240 python benchmarks/profile_block.py --model lm --context 32k --batch 8 \
            --variants block-ro --top 30 --gaps 10 --out "$OUT/profile_lm_32k_b8" ;;
    combo) on_off lm_32k_b1_combo lm_32k_b1_no_combo combo_kernels block-ro 200 ;;
    video) step e2e_video 420 python -m fbcompile bench --workloads benchmarks.e2e:workloads --model video \
        --contexts 8k,32k --batches 1 --variants compile,exact-ro,block-ro --repeats 3 --out "$OUT/e2e_video" ;;
    video_32k) step e2e_video_32k 420 python -m fbcompile bench --workloads benchmarks.e2e:workloads --model video \
        --contexts 32k --batches 1 --variants exact,block,exact-ro,block-ro --repeats 3 --out "$OUT/e2e_video_32k" ;;
    wan) step e2e_wan "${WAN_LIMIT:-560}" python -m fbcompile bench --workloads benchmarks.e2e:workloads --model wan \
        --contexts 32k --batches 1 --variants "${WAN_VARIANTS:-eager,compile,exact-ro,block-ro}" --repeats 3 --out "$OUT/e2e_wan" ;;
    wan_profile) step profile_wan_32k 420 python benchmarks/profile_block.py --model wan --context 32k --batch 1 \
        --variants compile,exact-ro,block-ro --warmup 2 --top 30 --ops 16 --out "$OUT/profile_wan_32k" ;;
    wan_host) step host_wan_32k 300 python benchmarks/profile_block.py --model wan --context 32k --batch 1 \
        --variants block-ro,exact-ro --warmup 2 --host 2 --top 45 --out "$OUT/host_wan_32k" ;;
    sparse)
        step sparse_64 150 env PYTHONPATH=. python benchmarks/sparse_attention.py --out "$OUT" --tile 64 --sweep ;;
    *) echo "unknown step $name" ;;
    esac
done
tail -n 4 "$OUT"/*.txt
