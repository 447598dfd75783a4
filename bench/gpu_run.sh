#!/usr/bin/env bash
# One GPU-machine call: install tpfuse (and FlashInfer if .whl was carried), then run the chosen steps.
#   bash bench/gpu_run.sh [STEP ...]      steps: env tests probe_ce async_tp fused_ar local rope decode_attn host
#                                         profile e2e e2e_full e2e_shards load tune demo onegpu soak probe_onegpu
#                                         small_gemm e2e_ab e2e_big fp8cache fusedrope fusedcomb foldnorm
#                                         kvprefetch fp8f16 argmax smallm64 opf attntail profiles accuracy
#                                         splitcand trigger tiles16 hoist gpf w8 w8ab vhead defaults fma tma tma_ab ncu
#                                         carveout attnfold
#                                         (default: all but probe_ce, profile, profiles, e2e_full, e2e_shards, load,
#                                         onegpu, soak, probe_onegpu, small_gemm, e2e_ab, e2e_big, fp8cache,
#                                         fusedrope, fusedcomb, foldnorm, kvprefetch, fp8f16, argmax, smallm64,
#                                         opf, attntail, accuracy, splitcand, trigger, tiles16, hoist, gpf, w8, w8ab,
#                                         vhead, defaults, fma, tma, tma_ab, ncu, carveout, attnfold;
#                                         multi-GPU steps skip on one GPU)
#   ncu: Nsight Compute (--set full, clocks left alone) over the first NCU_COUNT (40) launches of the decode kernels
#        NCU_KERNELS (a regex: rope-split attention, its combine, the small-M GEMMs, add + RMSNorm) of a 2-layer
#        model per entry of NCU_PROFILES ("8B/tp2:1 8B:16": model:batch), graph-replayed (profile_decode.py
#        --replay-only); $OUT/ncu/<model>_b<batch>.ncu-rep, the details page as CSV and text, and a row per launch
#        (bench/tools/ncu_summary.py: ncu_decode_<device>_<model><batch>.json); ~2 min an entry
#        (LIMIT_ncu, default 300 s for all; the .ncu-rep files are ~40 MB: too large to come back from the device)
#   profiles: where the decode step goes, at full size with PDL (profile_decode.py: kernel and exposed time per
#         kernel, JSON + PNG each, $OUT/profiles), one profile per entry of PROFILES (default "8B:1 8B:8 8B:64
#         8B:1:fp8 8B:64:fp8 70B/tp8:1": model:batch[:fp8]), ~30 s each; LIMIT_profiles (default 300) for all.
#         One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh profiles
#   e2e_full / e2e_shards: bench_e2e.py at TP=1 (one process whatever the GPU count) at full size, real vocab;
#           JSON + PNG e2e_tp1_<device>_full / _shards; E2E_FULL_ARGS / E2E_SHARDS_ARGS are appended (a repeated
#           option overrides). Default limits 330 s / 150 s (LIMIT_e2e_full, LIMIT_e2e_shards): both in one
#           8-minute call as `bash bench/gpu_run.sh e2e_shards e2e_full` (estimates at the steps below)
#   onegpu: the multi-rank GPU suite in one-GPU mode (N ranks on one GPU) at each TP of ONEGPU_TP (default 2),
#           JUnit XML + onegpu_suite_<device>_tp<N>.json; ONEGPU_TESTS overrides the files, ONEGPU_K (or
#           ONEGPU_K_<tp> for one TP size) adds a -k filter, ONEGPU_MAXFAIL stops a TP size after that many failures,
#           ONEGPU_TODO=1 runs only the tests bench/results has not seen pass at that TP (ONEGPU_AFTER=<ISO date>:
#           count only runs from then on; bench/tools/onegpu_coverage.py --todo);
#           its decode-graph soak runs 2000 replays; timing_tp<N>.tsv says per test how long its ranks took and how
#           much of it was Triton compiles (TPFUSE_TEST_TIMING, summed up by bench/tools/suite_timing.py).
#           ONEGPU_MPS=1 runs the ranks concurrently under an MPS daemon of this call's own (the persistent kernels
#           then run on half the SMs split among the ranks: persistent_grid); without it the ranks' contexts take
#           turns (milliseconds a call: a TP size needs more than one call); under MPS a TP size's files run as two pytest
#           runs at once (ONEGPU_GROUPS=2, the default there; 1: one run; ONEGPU_GROUP_B names the second run's files,
#           ONEGPU_SOLO the files run alone afterwards), every kernel then sized for both runs' processes
#           (TPFUSE_ONE_GPU_PROCESSES = 2 x TP)
#   soak: the TP=2 decode-graph soak alone, SOAK_REPLAYS (default 100000) replays (one-GPU mode on one GPU; ~5 ms
#         a replay time-sliced: about 9 minutes; ONEGPU_MPS=1 as above: 36 s on one H100), JUnit XML +
#         onegpu_suite_<device>_soak_tp2.json (replays and worst logits error among the test's properties)
#   small_gemm: the small-M GEMM sweep (bench/tune_small_gemm.py, one GPU, ~150 s: --budget-s; SMALL_GEMM_ARGS adds
#         options): small_gemm_<device>.json + .png and the routing table small_m_gemm_<arch>.json (copy it to
#         tpfuse/thresholds/ to ship it). One call: TPFUSE_COMMIT=<sha> LIMIT_small_gemm=200 bash bench/gpu_run.sh small_gemm
#   e2e_ab: the full 8B's decode rows and their variants (bench_e2e.py --tag ab): SMALL_M_TABLE, the small-M
#         GEMM routing table to A/B against the shipped one (--small-m-table: <provider>_smallm rows; default: the
#         H100 sweep of 14a3f4c in bench/results as written then, at the old 2% margin: the shipped table is that
#         sweep at WIN_MARGIN 1.0 with the 8B's points re-swept at 1b777fa; SMALL_M_TABLE= turns them off), E2E_PDL=1 (the default; 0: off):
#         --pdl-ab rows (_nopdl: decode graphs captured without programmatic dependent launch, which the default
#         KVCacheConfig has; _prefetch: with it and the L2 prefetches before its waits), and the table with every
#         swept GEMM on the kernel (--small-m-everywhere: _smallall, _smallall_nopdl);
#         E2E_AB_ARGS appended. One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh e2e_ab
#   fp8cache: decides decode attention's FP8-cache defaults in one call (~2 min): the FP8 GPU tests of
#         tests/test_decode_attention.py (word loads == e4m3 loads bitwise, the swept rule's 32-key tiles), then
#         bench_decode_attention.py at B 1 / 8 / 64 (tpfuse_fp8 vs tpfuse_fp8_words) with the FP8 sweep at B 8 / 64
#         over both tile loads (FP8CACHE_ARGS appended): fp8cache/decode_attention_<device>.json
#   fusedrope: decides KVCacheConfig.fuse_rope in one call (~4 min): the GPU tests of
#         tpfuse.attention.rope_decode_attention (tests/test_rope_decode_attention.py: model shapes at B 1 / 8 / 64,
#         QK-norm, FP8 cache, CUDA-graph replay, torch.compile) and both decode paths of the model
#         (test_rope_decode_paths_match_eager_and_oracle), then the 8B and Qwen3-32B (whole; a QK-norm model) decode
#         rows at B 1 / 8 with fuse_rope the other way than the default right after each (bench_e2e.py --rope-ab,
#         --tag rope_ab, FUSEDROPE_ARGS appended). One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh fusedrope
#   fusedcomb: the GPU tests of decode attention with its combine in the split kernel (decode_attention.FUSE_COMBINE:
#         -k fused in tests/test_decode_attention.py and tests/test_rope_decode_attention.py - model shapes, graph
#         replays, 300 contended launches and 300 replays against the combine kernel, the capture fallback - and the
#         model's decode through it, test_fused_combine_decode_matches_eager_and_oracle; ~2-3 min). Its A/B rows:
#         --combine-ab in E2E_FULL_ARGS / E2E_SHARDS_ARGS. One call: TPFUSE_COMMIT=<sha> E2E_FULL_ARGS=--combine-ab
#         E2E_SHARDS_ARGS=--combine-ab bash bench/gpu_run.sh fusedcomb e2e_shards e2e_full
#   foldnorm: decides KVCacheConfig.fold_norms (each add + RMSNorm folded into the GEMMs around it, TP = 1): the
#         GPU tests of tpfuse.small_gemm.small_m_gemm_add and of the normed-input GEMM (tests/test_small_m_gemm_add.py:
#         the 8B's layer boundaries at M 1 / 8 / 64, a CUDA graph) and the model's graph decode folded and not, with
#         and without PDL (tests/distributed/test_fold_norms_model.py), ~1-2 min; then the full 8B's decode profile
#         at batch 1 folded (profile_decode.py --fold-norms: kernels per layer; FOLDNORM_PROFILE_ARGS appended,
#         ~40 s). Its A/B rows: --fold-ab in E2E_FULL_ARGS. One call: TPFUSE_COMMIT=<sha> E2E_FULL_ARGS=--fold-ab
#         bash bench/gpu_run.sh foldnorm e2e_full
#   kvprefetch: decides decode_attention.PREFETCH with the RoPE fused (the first K / V tile into L2 before the PDL
#         wait): its GPU test (test_gpu_kv_prefetch_under_pdl: bitwise equal to the launch without it, B 1 / 8 / 64,
#         bf16 and FP8 caches), then the full 8B's decode rows with and without it, the GEMMs' weight prefetch off
#         (bench_e2e.py --pdl-ab --prefetch-kib 0: rows _prefetch, bf16 cache; --tag kvpf_ab; KVPREFETCH_ARGS
#         appended), ~2-3 min. One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh kvprefetch
#   fp8f16: decides decode_attention.FP8_F16 (e4m3-cache tile loops in fp16): its tests (-k f16_loop in
#         tests/test_decode_attention.py and tests/test_rope_decode_attention.py: model shapes, the oracle's bounds,
#         within one bf16 step of the bf16 loop, the same cache bytes, the PDL builds bitwise equal to the others;
#         the model's graph and eager decode against the fp64 oracle with it on, test_fp8_f16_decode_matches_*;
#         the word loads (FP8_WORDS) bitwise equal to the byte loads in both loops, word_loads),
#         bench_decode_attention.py at B 1 / 8 / 64 (tpfuse_fp8 vs tpfuse_fp8_f16 vs tpfuse_fp8_f16_words;
#         fp8f16/decode_attention_<device>.json), then the full 8B's e4m3-cache decode
#         rows both ways (bench_e2e.py --kv-fp8 --f16-ab --tag f16_ab, FP8F16_ARGS appended), ~4 min.
#         One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh fp8f16
#   smallm64: the small-M GEMM at M = 32 / 64 (~8 min): the sweep over the 8B's TP 1 / 2 shapes with the wide
#         tiles and split-K 1 / 2 (tune_small_gemm.py WIDE_M; SMALLM64_SWEEP_ARGS appended), its table merged over
#         the committed H100 sweep (--base-sweep; smallm64/small_m_gemm_<arch>.json), then the full 8B's decode rows
#         at batch 32 / 64 with that table (rows _smallm; SMALLM64_AB_ARGS appended, e.g. --decode-batches 1,8,32,64
#         --rope-ab). One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh smallm64
#   opf: decides KVCacheConfig.prefetch_o_proj (~4 min): its tests (tests/test_l2_prefetch.py: the side-stream
#         prefetch changes no byte, its fork / join in a captured graph; test_gpu_next_weight_prefetch_under_pdl: the
#         fused attention kernel's own prefetch, bit for bit; the model's graph decode with it on equals it off bit
#         for bit, bf16 and per-channel FP8, in-kernel and side stream), then the full 8B's decode rows at batch
#         1 / 8 / 64 with it the other way (bench_e2e.py --opf-ab --tag opf_ab; OPF_ARGS appended). One call:
#         TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh opf
#   attntail: decode attention's one-split tiles at contexts past a multiple of 128 (~2 min): the kernel at batch
#         64 x 1024 / 1040 / 1088 / 4096 / 4112 keys, every tile x warps at one split (--sweep;
#         attntail/decode_attention_<device>.json), then the full 8B's decode rows at batch 32 / 64 with
#         decode_attention.ONE_SPLIT_TILES 128 x 8 everywhere, the rule before its 32 x 4 step (bench_e2e.py
#         --tile-ab --tag tile_ab, rows _tile128).
#         One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh attntail
#   accuracy: #22's accuracy target on the full 8B (bench/bench_accuracy.py, TP = 1, one GPU): the logits of
#         hf_bf16, tpfuse (graph decode, KVCacheConfig's defaults) and tpfuse_fp8 vs an fp32 copy of the same
#         random bf16 weights, teacher-forced, batch 4 x (prompt 256 + 32 decode steps); rel_err, max_abs_err,
#         argmax agreement, rel_err per step; JSON + PNG accuracy_tp1_<device>_8B_32L. Memory peak ~49 GB (bf16
#         16 GB + the fp32 copy 32 GB, freed before the tpfuse runs). Estimate: start + build ~30 s, the oracle
#         and HF forwards ~5 s, Triton JIT + capture of the bf16 and FP8 decode steps ~40-80 s: ~80-120 s;
#         LIMIT_accuracy (default 240). ACCURACY_ARGS appended (--no-fp8, --batch, --prompt, --steps, --seed).
#         One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh accuracy
#   splitcand: decides the decode attention's bf16 split rule candidate (decode_attention.SPLIT_WAVES 4 /
#         MULTI_SPLIT_TILE 64: 8 splits of 64-key tiles at B 8, 0.86-0.88x in the kernel bench at 7fdfb52) in one
#         call (~4 min): its GPU tests (test_gpu_split_candidate_model_shapes: B 3 / 8 / 16 / 32, RoPE and QK-norm,
#         combine kernel and fused; ~16 builds), then the full 8B's decode rows at B 8 / 16 / 32 with it
#         (bench_e2e.py --split-ab, rows _split4x64; SPLITCAND_ARGS appended).
#         One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh splitcand
#   trigger: decides kernels.pdl.EARLY_TRIGGER (the small-M GEMM and the decode attention's split kernels trigger
#         their PDL dependents right after their wait, not after their main loop) in one call (~4 min): the GPU test
#         of the model's graph decode with PDL both ways (test_graph_decode_through_the_kernel_and_with_pdl_...:
#         logits equal bit for bit to the graphs without PDL; TP 1 and one-GPU TP 2), then the full 8B's
#         decode rows at B 1 / 8 / 64 with it, and with 4 MiB of L2 prefetch a GEMM launch too (bench_e2e.py
#         --trigger-ab --prefetch-kib 4096, rows _early / _earlypf; TRIGGER_ARGS appended).
#         One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh trigger
#   tiles16: the small-M GEMM sweep with 16-row (mma.sync-sized: twice the programs of 32-row tiles) and deeper
#         tiles too (tune_small_gemm.py --tiles; 8B TP 1 / 2 and 70B TP 4 / 8 shapes, M 1 / 8 / 16, over the shipped
#         table's sweeps), then its table A/B on the full 8B at batch 1 / 8 (rows _smallm) and on the shard rows at
#         batch 1 (_smallm; TILES16_SHARDS: which shards); ~6 min. TILES16_SWEEP_ARGS / TILES16_AB_ARGS appended.
#         One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh tiles16
#   hoist: decides decode_attention.HOIST_MAX_BATCH (the rope-split kernel's reads before its PDL wait): the full 8B at
#         batch 1 / 8 / 64 and the shard rows at batch 1 with --hoist-ab (rows _hoist0 / 1 / 2; HOIST_AB_ARGS
#         appended, HOIST_SHARDS: which shards, HOIST_SHARDS_ARGS appended to theirs), then the hoisted builds' GPU tests (tests/test_rope_decode_attention.py
#         -k hoisted: bit for bit the default ones under PDL) and the model's PDL graph decode at TP 1 / 2 (mode
#         "hoist"; HOIST_TESTS_K overrides the -k filter); ~7 min.
#         One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh hoist
#   w8: the small-M GEMM sweep of weight-only FP8 (e4m3 weights, per-channel scales, bf16 activations: scheme
#       w8_bf16 and its SiLU*mul epilogue, against F.linear on the bf16 weights; W8_MODELS, default 8B: TP 1 / 2;
#       W8_M, default 1,8,64; W8_BUDGET_S; W8_SWEEP_ARGS appended): $OUT/w8, its table the shipped one's sweeps with
#       these points over them (w8ab times it as the _smallm rows); ~3 min.
#   w8ab: decides KVCacheConfig.fp8_weight_only_max_tokens: the GPU tests of the weight-only FP8 layers
#       (tests/distributed/test_fp8_weight_only_model.py: CUDA-graph decode with and without PDL vs the oracle at TP 1 / 2;
#       the small-M GEMM's w8 tests; W8AB_TESTS_K overrides the -k filter), then the full 8B's decode rows with
#       weight-only up to W8AB_TOKENS (default 64: --fp8-weight-only) and --w8-ab (rows _actq: the activations
#       quantized; W8AB_BATCHES, default 1,16,64; W8AB_ARGS, default --fold-ab: rows _normkern, the weight-only
#       layers' RMSNorms in their own kernels) and, after the w8 step, its table (rows _smallm); ~6 min.
#       One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh w8 w8ab
#   gpf: decides small_m_gemm.PREFETCH_MAX_M (the small-M GEMMs' first weight lines prefetched before their PDL wait
#         at batch 1): the shard rows and the full 8B at batch 1 with --gemm-prefetch-ab (rows _gpf1m / _gpf4m;
#         GPF_SHARDS, GPF_AB_ARGS), then the model's PDL graph decode at TP 1 / 2 (mode "gpf"); ~5 min.
#         One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh gpf
#   vhead: the vocabulary-parallel lm_head's shard rows: 70B TP 8 / 4 and 8B TP 2 shards (VHEAD_SHARDS) at batch
#          1 / 16 (VHEAD_BATCHES) with --head-ab (rows tpfuse_headrep + memory_floor_headrep: the whole head);
#          VHEAD_ARGS appended; ~2 min. Its GPU tests are the model tests at TP > 1 (the head is on by default):
#          TPFUSE_COMMIT=<sha> ONEGPU_MPS=1 ONEGPU_TP="8 2" ONEGPU_TESTS="tests/distributed/test_model_runtime_gpu.py
#          tests/distributed/test_fp8_model_gpu.py" bash bench/gpu_run.sh vhead onegpu
#   defaults: the full 8B's decode rows with the defaults of this commit (bf16, per-channel and static FP8; no HF)
#         at DEFAULTS_BATCHES (default 1,16,64), prefill 1k; DEFAULTS_ARGS appended; ~2 min
#   fma: the weight-only GEMMs' CUDA-core main loop (small_m_gemm.FMA_MAX_M, off): its kernel, fold and model GPU
#        tests (FMA_TESTS_K), then the full 8B at batch 1 weight-only (--fp8-weight-only 1: rows tpfuse_fp8 on the
#        tensor-core loop, _fma on the CUDA cores, _actq the activation scheme that ships); FMA_AB_ARGS; then the
#        8B's weight-only GEMMs at M 1 on the CUDA-core loop per tile (tune_small_gemm --fma-max-m 4, FMA_TILES,
#        $OUT/fma: each tile's read bandwidth against F.linear of the bf16 weights); ~7 min.
#        One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh fma
#   tma: the small-M GEMM's weight tiles through TMA descriptors (GemmConfig.tma): its GPU tests and the eager
#        fast-launch tests (TMA_TESTS_K), the sweep with every tile also as its TMA twin (tune_small_gemm --tma:
#        TMA_MODELS 8B,70B x TMA_M 1,16,64 x TMA_SCHEMES bf16,fp8_row, TMA_BUDGET_S 200; $OUT/tma: sweep + routing
#        table over the shipped table's sweeps), then the shards at batch 1 with that table (_smallm) and with it on
#        pointer loads (_smallm_notma); ~8 min. tma_ab: the full 8B (bf16, per-channel and static FP8) at batch
#        TMA_AB_BATCHES (1,16,64) with the table TMA_TABLE (committed after a tma call), _smallm / _smallm_notma;
#        ~5 min. One call each: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh tma; TMA_TABLE=<json> ... tma_ab
#   carveout: kernels/carveout.py (every tpfuse kernel at the largest shared-memory carveout; not yet run on a GPU):
#        its GPU test, then the shards at batch 1 and the full 8B at CARVEOUT_BATCHES (1,16,64), rows _carve100;
#        ~8 min. One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh carveout
#   attnfold: KVCacheConfig.fold_attn_combine (the decode attention's split combine inside o_proj; not yet run on
#        a GPU) with the carveout A/B beside it: the GPU tests (tests/test_attn_o_gemm.py, the model's graph decode
#        in tests/distributed/test_attn_fold_model.py), then the shards at batch 1 (rows _attnfold and _carve100)
#        and the full 8B in bf16 at ATTNFOLD_BATCHES (1,8,16: where the attention splits), rows _attnfold; ~8 min.
#        One call: TPFUSE_COMMIT=<sha> bash bench/gpu_run.sh attnfold
#   argmax: the greedy pick's A/B (bench/bench_argmax.py: torch.argmax vs tpfuse.parallel.generate.greedy_tokens
#         and its chunk lengths, vocab 128256 / 32000 at B 1 / 8 / 64; ARGMAX_ARGS appended; ~20 s)
#   USE_TUNED=1: steps after `tune` load the table it wrote (TPFUSE_THRESHOLDS); LIMIT_<step>=seconds per step
# Logs, JSON and PNG go to $OUT (or bench/results/gpu-run when OUT is unset). Multi-GPU steps need >= 2 GPUs.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mps_start() {  # an MPS daemon of this call's own; no GPU setting changes (clocks, compute mode stay as found)
  command -v nvidia-cuda-mps-control >/dev/null || { echo "no nvidia-cuda-mps-control: ranks take turns"; return 1; }
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/tpfuse-mps CUDA_MPS_LOG_DIRECTORY=/tmp/tpfuse-mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d && echo "MPS daemon started"
}
mps_stop() { echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; }
run() {  # run NAME CMD...: log to $OUT/NAME.log, at most ${LIMIT_<NAME>:-600} s, remember failures, keep going;
         # OK_RC="5 ...": exit codes that count as success too (pytest's 5: no test selected); returns 0 or the failure
  local name=$1; shift
  local lim_var="LIMIT_${name}"; local lim=${!lim_var:-${LIMIT_DEFAULT:-600}}
  echo "=== $name (limit ${lim}s): $*"
  local t0=$SECONDS
  # SIGINT first: pytest then still prints its summary and writes its JUnit XML
  timeout -s INT -k 30 "$lim" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [[ $rc -eq 0 || " ${OK_RC:-} " == *" $rc "* ]] && return 0
  status=1
  return $rc
}
# the onegpu step's second group (ONEGPU_GROUPS=2): these files run in a pytest of their own beside the rest, each
# group's kernels on a quarter of the SMs (TPFUSE_ONE_GPU_PROCESSES); mostly peer timeouts and fresh processes, so
# they overlap the fused-AR file's Triton compiles (test time at TP 8, a72bca4: 157 + 76 + 43 + 40 s vs 241 + 23 s)
ONEGPU_GROUP_B=${ONEGPU_GROUP_B:-"test_fault_gpu test_async_tp_gpu test_parallelize_gpu test_model_runtime_gpu"}
ONEGPU_SOLO=${ONEGPU_SOLO:-"test_fault_catalog"}  # with two groups: run alone after them (1 s bounds on its faults)
onegpu_pytest() {  # onegpu_pytest NAME TP K PROCS TARGET...: one pytest run of the one-GPU suite (none selected: ok)
  # (its own --basetemp: two pytest sessions at once never share or clean each other's tmp_path)
  local name=$1 tp=$2 k=$3 procs=$4; shift 4
  OK_RC=5 run "$name" env TPFUSE_TEST_TP="$tp" TPFUSE_ONE_GPU_PROCESSES="$procs" TPFUSE_SOAK_REPLAYS=2000 \
    TPFUSE_TEST_TIMING="$OUT/timing_tp$tp.tsv" bash -c "python3 -m pytest -q -rs -p no:cacheprovider --basetemp=/tmp/tpfuse-pytest-$name --durations=20 \
    ${ONEGPU_MAXFAIL:+--maxfail=$ONEGPU_MAXFAIL} --junitxml=$OUT/$name.xml -k '$k' $(printf '%q ' "$@")"
}
onegpu_tp() {  # onegpu_tp TP K TARGET...: a TP size's tests in ONEGPU_GROUPS (1 or 2) pytest runs at once
  local tp=$1 k=$2; shift 2
  local a=() b=() solo=() t f pid=
  for t in "$@"; do
    f=${t%%::*}; f=${f##*/}; f=${f%.py}
    if [[ ${ONEGPU_GROUPS:-1} -ge 2 && " $ONEGPU_SOLO " == *" $f "* ]]; then solo+=("$t")
    elif [[ ${ONEGPU_GROUPS:-1} -ge 2 && " $ONEGPU_GROUP_B " == *" $f "* ]]; then b+=("$t"); else a+=("$t"); fi
  done
  [[ ${#a[@]} -eq 0 ]] && { a=("${b[@]}"); b=(); }
  local procs=$tp t0=$SECONDS; [[ ${#b[@]} -gt 0 ]] && procs=$((2 * tp))
  if [[ ${#b[@]} -gt 0 ]]; then
    local lim_var="LIMIT_onegpu_tp$tp" lim_b="LIMIT_onegpu_tp${tp}_b"
    export "$lim_b=${!lim_b:-${!lim_var:-${LIMIT_DEFAULT:-600}}}"
    onegpu_pytest "onegpu_tp${tp}_b" "$tp" "$k" "$procs" "${b[@]}" > "$OUT/onegpu_tp${tp}_b.out" 2>&1 & pid=$!
  fi
  [[ ${#a[@]} -gt 0 ]] && { onegpu_pytest "onegpu_tp$tp" "$tp" "$k" "$procs" "${a[@]}"
                             xmls+=("$OUT/onegpu_tp$tp.xml"); tps+=("$tp"); }
  if [[ -n $pid ]]; then
    wait "$pid" || status=1
    cat "$OUT/onegpu_tp${tp}_b.out"; rm -f "$OUT/onegpu_tp${tp}_b.out"
    xmls+=("$OUT/onegpu_tp${tp}_b.xml"); tps+=("$tp")
  fi
  if [[ ${#solo[@]} -gt 0 ]]; then  # alone, after the others: bounds of a second or less on its faults' timing
    local lim_main="LIMIT_onegpu_tp$tp" lim_solo="LIMIT_onegpu_tp${tp}_solo"
    export "$lim_solo=${!lim_solo:-${!lim_main:-${LIMIT_DEFAULT:-600}}}"
    onegpu_pytest "onegpu_tp${tp}_solo" "$tp" "$k" "$tp" "${solo[@]}"
    xmls+=("$OUT/onegpu_tp${tp}_solo.xml"); tps+=("$tp")
  fi
  echo "=== TP=$tp: the whole selection in $((SECONDS - t0)) s wall ($([[ -n $pid ]] && echo 2 || echo 1) pytest runs at once)"
  [[ -f $OUT/timing_tp$tp.tsv ]] && python3 bench/tools/suite_timing.py "$OUT/timing_tp$tp.tsv" --top 12
}
# sourced (tests/test_gpu_run_script.py): the functions above only, nothing installed or run
[[ ${BASH_SOURCE[0]} != "$0" ]] && return 0
OUT=${OUT:-bench/results/gpu-run}; mkdir -p "$OUT"; export OUT
SMALL_M_TABLE=${SMALL_M_TABLE-bench/results/small_m_gemm_sm90_h100_14a3f4c.json}
[[ -z $SMALL_M_TABLE || -f $SMALL_M_TABLE ]] || { echo "SMALL_M_TABLE=$SMALL_M_TABLE: no such file"; SMALL_M_TABLE=; }
PDL_ARG=; [[ ${E2E_PDL:-1} == 1 ]] && PDL_ARG=--pdl-ab
steps=("$@"); [[ ${#steps[@]} -gt 0 ]] || steps=(env tests async_tp fused_ar local rope decode_attn host e2e tune demo)
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
python3 -m pip install -q --no-deps --no-build-isolation --no-index . 2>&1 | grep -v WARNING
rm -rf .site  # never reuse packages a previous call installed
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl 2>&1 | grep -v WARNING
  export PYTHONPATH=$PWD/.site:${PYTHONPATH:-} FLASHINFER_CUDA_ARCH_LIST=9.0a
fi
export TPFUSE_COMMIT=${TPFUSE_COMMIT:-unknown}  # pass the commit in: the device copy has no .git
status=0
TR2=(python3 -m torch.distributed.run --standalone --nproc-per-node="$ngpu")  # an array: `timeout` runs it
TR1=(python3 -m torch.distributed.run --standalone --nproc-per-node=1)
for s in "${steps[@]}"; do
  case "$s" in
    env) run env bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.nccl.version())"; python3 -c "import flashinfer; print(\"flashinfer\", flashinfer.__version__)" || true' ;;
    tests) run tests bash -c "python3 -m pytest -q -rs ${TEST_ARGS:-tests}" ;;  # bash -c: quoted -k expressions survive
    async_tp) [[ $ngpu -ge 2 ]] && run async_tp "${TR2[@]}" bench/bench_async_tp.py ${ASYNC_TP_ARGS:-} ;;
    fused_ar) [[ $ngpu -ge 2 && -f bench/bench_fused_ar.py ]] && run fused_ar "${TR2[@]}" bench/bench_fused_ar.py ${FUSED_AR_ARGS:-} ;;
    e2e) run e2e "${TR2[@]}" bench/bench_e2e.py ${E2E_ARGS:-} ;;  # TP = every GPU of the machine (1 included)
    # e2e_full, one H100 (estimates from e2e_tp1_h200_8b_c2bd6cd.json / its log, bench_load's 8B build + write in 32 s,
    # the README's ~1 min per HF compile at 4 layers; the 8B step at 32 layers ~5-6 ms on an H100):
    #   start, copy bandwidth, fp8_quality tiny model, Triton JIT of tpfuse's kernels (fresh machine)  ~60 s
    #   full 8B: build 16 GB in bf16 (~10 s), tpfuse decode b1/b8/b64 (prefills of 1k/8k/64k tokens, graph
    #     captures, 35 steps each) + memory floor + prefill 1k/4k                                      ~25 s
    #   capacity rows 8x1152, 8x32768 (b1, b8), 64x1152, 256x1152 (b1, b8, b64; KV 40 GiB at 256x1152)  ~25 s
    #   tpfuse_fp8 (in place) + tpfuse_fp8_static (a second build + calibration), all batches + prefill ~50 s
    #   --kv-fp8: tpfuse_kv8 / tpfuse_fp8_kv8 (the decode rows again with an e4m3 KV cache)                  ~10 s
    #   --hf-after: a fresh build, hf_eager b1/b8/b64 (~40 ms a step) + prefill, then hf_compiled at b1 and
    #     b64: ~1-2 min per compile at 32 layers (the unknown part; last, so a cut-off loses only it)  ~150-250 s
    #   total ~310-410 s: LIMIT_e2e_full 330 by default (the JSON is written after every phase); measured at
    #   14a3f4c: 136 s on one H100 (logs/gpu_run_14a3f4c_h100_e2e_full.log; the HF compiles took far less than
    #   estimated); at 0fc9473 with --fold-ab --rope-ab 171 s on one H200 (logs/gpu_run_0fc9473_h200_e2e_full.log)
    e2e_full) LIMIT_e2e_full=${LIMIT_e2e_full:-330} run e2e_full "${TR1[@]}" bench/bench_e2e.py --tag full --models 8B \
                --layers full --decode-batches 1,8,64 --context 1024 --prefill 1024,4096 --hf-models 8B \
                --compile-batches 1,64 --hf-after --kv-capacities 8x1152,8x32768,64x1152,256x1152 --kv-fp8 \
                ${E2E_FULL_ARGS:-} ;;
    # e2e_shards: rank 0's shard of 70B at TP 8 (21 GB: 80 layers, 8 q / 1 kv heads, intermediate 3584, embedding
    # whole, lm_head rank 0's vocabulary rows) and TP 4 (38 GB), of 8B at TP 2 (9 GB), each built at TP=1: start ~20 s, per model a build
    # (~5-15 s), Triton JIT for its shapes (~10 s), b1 and b64 (a 64k-token prefill: ~1-4 s) and prefill 1k  ~100-120 s
    # (measured at 14a3f4c: 38 s on one H100, logs/gpu_run_14a3f4c_h100_e2e_shards.log)
    e2e_shards) LIMIT_e2e_shards=${LIMIT_e2e_shards:-150} run e2e_shards "${TR1[@]}" bench/bench_e2e.py --tag shards \
                  --models 70B/tp8,70B/tp4,8B/tp2 --layers full --decode-batches 1,64 --context 1024 --prefill 1024 \
                  --hf-models none --no-fp8 ${E2E_SHARDS_ARGS:-} ;;
    # e2e_big: Qwen3-32B and 70B with as many layers as fit (--layers fit, the count printed): Qwen3-32B's 64 layers
    # are ~62 GB in bf16 + ~3 GB of vocab, so with batch 1 / 8 (KV ~2 GB) it fits an 80 GB H100 whole; 70B gets
    # 35-39 of its 80. Per model a build of ~60 GB (~15-30 s), Triton JIT ~10 s, the decode rows and prefill 1k, no HF,
    # no FP8 (a second copy would not fit)                                                             ~120-150 s
    e2e_big) LIMIT_e2e_big=${LIMIT_e2e_big:-240} run e2e_big "${TR1[@]}" bench/bench_e2e.py --tag big \
               --models Qwen3-32B,70B --layers fit --decode-batches 1,8 --context 1024 --prefill 1024 \
               --hf-models none --no-fp8 ${E2E_BIG_ARGS:-} ;;
    # e2e_ab: the decode-row variants of the full 8B in a run of their own (a CUDA error in a variant never costs
    # the e2e_full rows): every tpfuse / tpfuse_fp8 / tpfuse_fp8_static decode row at batch 1 / 8 / 64, then the
    # same row with the sweep's small-M table (SMALL_M_TABLE), with PDL (E2E_PDL=1) and with both. Estimate: build,
    # tiny FP8 quality and Triton JIT ~40 s; 36 decode rows of ~1-2 s (a prefill, a capture, 32 steps); the FP8
    # static build + calibration ~20 s: ~120 s. JSON e2e_tp1_<device>_ab; bench/tools/e2e_table.py prints the ratios
    e2e_ab) LIMIT_e2e_ab=${LIMIT_e2e_ab:-240} run e2e_ab "${TR1[@]}" bench/bench_e2e.py --tag ab --models 8B \
              --layers full --decode-batches 1,8,64 --context 1024 --prefill 1024 --hf-models none \
              ${SMALL_M_TABLE:+--small-m-table "$SMALL_M_TABLE" --small-m-everywhere} ${PDL_ARG:-} ${E2E_AB_ARGS:-} ;;
    fp8cache) run fp8cache_tests bash -c "python3 -m pytest -q -rs tests/test_decode_attention.py -k 'fp8 or word'"
              LIMIT_fp8cache_bench=${LIMIT_fp8cache_bench:-240} run fp8cache_bench python3 bench/bench_decode_attention.py \
                --batches 1,8,64 --block-size 256 --sweep --sweep-batches 8,64 --sweep-splits 1,2,4,8 \
                --sweep-cache fp8_both --out-dir "$OUT/fp8cache" ${FP8CACHE_ARGS:-} ;;
    fusedrope) LIMIT_fusedrope_tests=${LIMIT_fusedrope_tests:-240} run fusedrope_tests bash -c "python3 -m pytest -q \
                 -rs tests/test_rope_decode_attention.py \
                 tests/distributed/test_model_runtime_gpu.py::test_rope_decode_paths_match_eager_and_oracle"
               LIMIT_fusedrope_ab=${LIMIT_fusedrope_ab:-240} run fusedrope_ab "${TR1[@]}" bench/bench_e2e.py \
                 --tag rope_ab --models 8B,Qwen3-32B --layers fit --decode-batches 1,8 --context 1024 \
                 --prefill 1024 --hf-models none --no-fp8 --rope-ab ${FUSEDROPE_ARGS:-} ;;
    fusedcomb) LIMIT_fusedcomb_tests=${LIMIT_fusedcomb_tests:-240} run fusedcomb_tests bash -c "python3 -m pytest -q \
                 -rs -k fused tests/test_decode_attention.py tests/test_rope_decode_attention.py \
                 tests/distributed/test_model_runtime_gpu.py::test_fused_combine_decode_matches_eager_and_oracle" ;;
    foldnorm) LIMIT_foldnorm_tests=${LIMIT_foldnorm_tests:-150} run foldnorm_tests bash -c "python3 -m pytest -q -rs \
                tests/test_small_m_gemm_add.py tests/distributed/test_fold_norms_model.py"
              LIMIT_foldnorm_profile=${LIMIT_foldnorm_profile:-90} run foldnorm_profile "${TR1[@]}" \
                bench/profile_decode.py --layers full --fold-norms ${FOLDNORM_PROFILE_ARGS:-} ;;
    kvprefetch) LIMIT_kvprefetch_tests=${LIMIT_kvprefetch_tests:-120} run kvprefetch_tests bash -c "python3 -m pytest \
                  -q -rs -k prefetch tests/test_rope_decode_attention.py"
                LIMIT_kvprefetch_ab=${LIMIT_kvprefetch_ab:-200} run kvprefetch_ab "${TR1[@]}" bench/bench_e2e.py \
                  --tag kvpf_ab --models 8B --layers full --decode-batches 1,8,64 --context 1024 --prefill 1024 \
                  --hf-models none --pdl-ab --prefetch-kib 0 ${KVPREFETCH_ARGS:-} ;;
    fp8f16) LIMIT_fp8f16_tests=${LIMIT_fp8f16_tests:-150} run fp8f16_tests bash -c "python3 -m pytest -q -rs \
              -k 'f16_loop or fp8_f16_decode or word_loads' tests/test_decode_attention.py tests/test_rope_decode_attention.py \
              tests/distributed/test_model_runtime_gpu.py"
            LIMIT_fp8f16_bench=${LIMIT_fp8f16_bench:-120} run fp8f16_bench python3 bench/bench_decode_attention.py \
              --batches 1,8,64 --block-size 256 --out-dir "$OUT/fp8f16"
            LIMIT_fp8f16_ab=${LIMIT_fp8f16_ab:-200} run fp8f16_ab "${TR1[@]}" bench/bench_e2e.py --tag f16_ab \
              --models 8B --layers full --decode-batches 1,8,64 --context 1024 --prefill 1024 --hf-models none \
              --no-fp8 --kv-fp8 --f16-ab ${FP8F16_ARGS:-} ;;
    argmax) run argmax python3 bench/bench_argmax.py ${ARGMAX_ARGS:-} ;;
    splitcand) LIMIT_splitcand_tests=${LIMIT_splitcand_tests:-150} run splitcand_tests bash -c "python3 -m pytest -q \
                 -rs tests/test_rope_decode_attention.py -k split_candidate"
               LIMIT_splitcand_ab=${LIMIT_splitcand_ab:-150} run splitcand_ab "${TR1[@]}" bench/bench_e2e.py \
                 --tag split_ab --models 8B --layers full --decode-batches 8,16,32 --context 1024 --prefill 1024 \
                 --hf-models none --split-ab ${SPLITCAND_ARGS:-} ;;
    trigger) LIMIT_trigger_tests=${LIMIT_trigger_tests:-200} run trigger_tests bash -c "python3 -m pytest -q -rs \
               tests/distributed/test_small_m_model.py -k 'graph_decode_through_the_kernel_and_with_pdl and (tp1 or tp2)'"
             LIMIT_trigger_ab=${LIMIT_trigger_ab:-200} run trigger_ab "${TR1[@]}" bench/bench_e2e.py \
               --tag trigger_ab --models 8B --layers full --decode-batches 1,8,64 --context 1024 --prefill 1024 \
               --hf-models none --trigger-ab --prefetch-kib 4096 ${TRIGGER_ARGS:-} ;;
    hoist) LIMIT_hoist_ab=${LIMIT_hoist_ab:-220} run hoist_ab "${TR1[@]}" bench/bench_e2e.py --tag hoist_ab \
             --models 8B --layers full --decode-batches 1,8,64 --context 1024 --prefill 1024 --hf-models none \
             --hoist-ab ${HOIST_AB_ARGS:-}
           LIMIT_hoist_shards=${LIMIT_hoist_shards:-100} run hoist_shards "${TR1[@]}" bench/bench_e2e.py \
             --tag shards_hoist_ab --models "${HOIST_SHARDS:-70B/tp8,70B/tp4,8B/tp2}" --layers full --decode-batches 1 \
             --context 1024 --prefill 1024 --hf-models none --no-fp8 --hoist-ab ${HOIST_SHARDS_ARGS:-}
           LIMIT_hoist_tests=${LIMIT_hoist_tests:-240} run hoist_tests bash -c "python3 -m pytest -q -rs \
             --junitxml=$OUT/hoist_tests.xml tests/test_rope_decode_attention.py \
             tests/distributed/test_small_m_model.py -k '${HOIST_TESTS_K:-hoisted or (graph_decode_through_the_kernel_and_with_pdl and (tp1 or tp2))}'" ;;
    gpf) LIMIT_gpf_shards=${LIMIT_gpf_shards:-100} run gpf_shards "${TR1[@]}" bench/bench_e2e.py --tag shards_gpf_ab \
           --models "${GPF_SHARDS:-70B/tp8,70B/tp4,8B/tp2}" --layers full --decode-batches 1 --context 1024 \
           --prefill 1024 --hf-models none --no-fp8 --gemm-prefetch-ab
         LIMIT_gpf_ab=${LIMIT_gpf_ab:-120} run gpf_ab "${TR1[@]}" bench/bench_e2e.py --tag gpf_ab --models 8B \
           --layers full --decode-batches 1 --context 1024 --prefill 1024 --hf-models none --gemm-prefetch-ab \
           ${GPF_AB_ARGS:-}
         LIMIT_gpf_tests=${LIMIT_gpf_tests:-150} run gpf_tests bash -c "python3 -m pytest -q -rs \
           --junitxml=$OUT/gpf_tests.xml tests/distributed/test_small_m_model.py \
           -k 'graph_decode_through_the_kernel_and_with_pdl and (tp1 or tp2)'" ;;
    defaults) LIMIT_defaults=${LIMIT_defaults:-200} run defaults "${TR1[@]}" bench/bench_e2e.py --tag defaults \
                --models 8B --layers full --decode-batches "${DEFAULTS_BATCHES:-1,16,64}" --context 1024 \
                --prefill 1024 --hf-models none ${DEFAULTS_ARGS:-} ;;
    vhead) LIMIT_vhead_shards=${LIMIT_vhead_shards:-180} run vhead_shards "${TR1[@]}" bench/bench_e2e.py \
             --tag shards_head_ab --models "${VHEAD_SHARDS:-70B/tp8,70B/tp4,8B/tp2}" --layers full \
             --decode-batches "${VHEAD_BATCHES:-1,16}" --context 1024 --prefill 1024 --hf-models none --no-fp8 \
             --head-ab ${VHEAD_ARGS:-} ;;
    w8) LIMIT_w8_sweep=${LIMIT_w8_sweep:-130} run w8_sweep python3 bench/tune_small_gemm.py --models "${W8_MODELS:-8B}" \
          --m "${W8_M:-1,8,64}" --schemes w8_bf16 --budget-s "${W8_BUDGET_S:-90}" --out-dir "$OUT/w8" \
          --base-sweep bench/results/small_gemm_h100_14a3f4c.json \
          --base-sweep bench/results/small_gemm_h100_alltiles_1b777fa.json ${W8_SWEEP_ARGS:-} ;;
    fma) LIMIT_fma_tests=${LIMIT_fma_tests:-150} run fma_tests bash -c "python3 -m pytest -q -rs \
           --junitxml=$OUT/fma_tests.xml tests/test_small_m_gemm.py tests/test_small_m_gemm_add.py \
           tests/distributed/test_fp8_weight_only_model.py -k '${FMA_TESTS_K:-fma or (graph_decode_weight_only and tp1)}'"
         LIMIT_fma_ab=${LIMIT_fma_ab:-200} run fma_ab "${TR1[@]}" bench/bench_e2e.py --tag fma_ab --models 8B \
           --layers full --decode-batches 1 --context 1024 --prefill 1024 --hf-models none --fp8-weight-only 1 \
           --w8-ab --fma-ab ${FMA_AB_ARGS:-}
         LIMIT_fma_sweep=${LIMIT_fma_sweep:-100} run fma_sweep python3 bench/tune_small_gemm.py --models 8B --m 1 \
           --schemes w8_bf16 --fma-max-m 4 --budget-s 80 --out-dir "$OUT/fma" \
           --tiles "${FMA_TILES:-32x256x4x1,32x512x4x1,64x256x4x1,16x512x4x1,64x512x8x1,16x256x4x1}" ;;
    tma) LIMIT_tma_tests=${LIMIT_tma_tests:-150} run tma_tests bash -c "python3 -m pytest -q -rs \
           --junitxml=$OUT/tma_tests.xml tests/test_small_m_gemm.py tests/test_eager_fast_path.py \
           -k '${TMA_TESTS_K:-tma or fast_launch}'"
         LIMIT_tma_sweep=${LIMIT_tma_sweep:-240} run tma_sweep python3 bench/tune_small_gemm.py \
           --models "${TMA_MODELS:-8B,70B}" --m "${TMA_M:-1,16,64}" --schemes "${TMA_SCHEMES:-bf16,fp8_row}" --tma \
           --budget-s "${TMA_BUDGET_S:-200}" --base-sweep bench/results/small_gemm_h100_14a3f4c.json \
           --base-sweep bench/results/small_gemm_h100_alltiles_1b777fa.json --out-dir "$OUT/tma" ${TMA_SWEEP_ARGS:-}
         tbl="$OUT/tma/small_m_gemm_$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"sm{m}{n}")').json"
         [[ -f $tbl ]] && LIMIT_tma_shards=${LIMIT_tma_shards:-150} run tma_shards "${TR1[@]}" bench/bench_e2e.py \
           --tag shards_tma_ab --models "${TMA_SHARDS:-70B/tp8,70B/tp4,8B/tp2}" --layers full --decode-batches 1 \
           --context 1024 --prefill 1024 --hf-models none --no-fp8 --small-m-table "$tbl" --tma-ab ;;
    carveout) LIMIT_carveout_tests=${LIMIT_carveout_tests:-90} run carveout_tests bash -c "python3 -m pytest -q -rs \
                --junitxml=$OUT/carveout_tests.xml tests/test_carveout.py"
              LIMIT_carveout_shards=${LIMIT_carveout_shards:-150} run carveout_shards "${TR1[@]}" bench/bench_e2e.py \
                --tag shards_carve_ab --models "${CARVEOUT_SHARDS:-70B/tp8,70B/tp4,8B/tp2}" --layers full \
                --decode-batches 1 --context 1024 --prefill 1024 --hf-models none --no-fp8 --carveout-ab
              LIMIT_carveout_ab=${LIMIT_carveout_ab:-300} run carveout_ab "${TR1[@]}" bench/bench_e2e.py \
                --tag carve_ab --models 8B --layers full --decode-batches "${CARVEOUT_BATCHES:-1,16,64}" \
                --context 1024 --prefill 1024 --hf-models none --carveout-ab ${CARVEOUT_AB_ARGS:-} ;;
    attnfold) LIMIT_attnfold_tests=${LIMIT_attnfold_tests:-240} run attnfold_tests bash -c "python3 -m pytest -q \
                -rs --junitxml=$OUT/attnfold_tests.xml tests/test_attn_o_gemm.py \
                tests/distributed/test_attn_fold_model.py::test_graph_decode_folded_matches_the_oracle"
              LIMIT_attnfold_shards=${LIMIT_attnfold_shards:-180} run attnfold_shards "${TR1[@]}" bench/bench_e2e.py \
                --tag shards_attnfold_ab --models "${ATTNFOLD_SHARDS:-70B/tp8,8B/tp2,70B/tp4}" --layers full \
                --decode-batches 1 --context 1024 --prefill 1024 --hf-models none --no-fp8 --attn-fold-ab \
                --carveout-ab
              LIMIT_attnfold_ab=${LIMIT_attnfold_ab:-150} run attnfold_ab "${TR1[@]}" bench/bench_e2e.py \
                --tag attnfold_ab --models 8B --layers full --decode-batches "${ATTNFOLD_BATCHES:-1,8,16}" \
                --context 1024 --prefill 1024 --hf-models none --no-fp8 --attn-fold-ab ${ATTNFOLD_AB_ARGS:-} ;;
    tma_ab) [[ -f ${TMA_TABLE:-} ]] || { echo "tma_ab: TMA_TABLE=<a small-M table with TMA rows> is needed"; status=1; }
            [[ -f ${TMA_TABLE:-} ]] && LIMIT_tma_ab=${LIMIT_tma_ab:-330} run tma_ab "${TR1[@]}" bench/bench_e2e.py \
              --tag tma_ab --models 8B --layers full --decode-batches "${TMA_AB_BATCHES:-1,16,64}" --context 1024 \
              --prefill 1024 --hf-models none --small-m-table "$TMA_TABLE" --tma-ab ${TMA_AB_ARGS:-} ;;
    w8ab) LIMIT_w8ab_tests=${LIMIT_w8ab_tests:-110} run w8ab_tests bash -c "python3 -m pytest -q -rs \
            --junitxml=$OUT/w8ab_tests.xml tests/distributed/test_fp8_weight_only_model.py tests/test_small_m_gemm.py \
            tests/test_small_m_gemm_add.py -k '${W8AB_TESTS_K:-weight_only or w8}'"
          tbl="$OUT/w8/small_m_gemm_$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"sm{m}{n}")').json"
          w8tbl=(); [[ -f $tbl ]] && w8tbl=(--small-m-table "$tbl")
          LIMIT_w8ab=${LIMIT_w8ab:-330} run w8ab "${TR1[@]}" bench/bench_e2e.py --tag w8_ab --models 8B --layers full \
            --decode-batches "${W8AB_BATCHES:-1,16,64}" --context 1024 --prefill 1024 --hf-models none --w8-ab \
            --fp8-weight-only "${W8AB_TOKENS:-64}" ${w8tbl[@]+"${w8tbl[@]}"} ${W8AB_ARGS---fold-ab} ;;
    tiles16) LIMIT_tiles16_sweep=${LIMIT_tiles16_sweep:-200} run tiles16_sweep python3 bench/tune_small_gemm.py \
               --models 8B,70B --m 1,8,16 --schemes bf16,fp8_row,fp8_tensor --budget-s 170 \
               --tiles 16x256x4x6,16x512x4x4,16x128x4x8,32x512x4x4,32x256x4x8 \
               --base-sweep bench/results/small_gemm_h100_14a3f4c.json \
               --base-sweep bench/results/small_gemm_h100_alltiles_1b777fa.json --out-dir "$OUT/tiles16" \
               ${TILES16_SWEEP_ARGS:-}
             tbl="$OUT/tiles16/small_m_gemm_$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"sm{m}{n}")').json"
             [[ -f $tbl ]] && LIMIT_tiles16_ab=${LIMIT_tiles16_ab:-150} run tiles16_ab "${TR1[@]}" bench/bench_e2e.py \
               --tag tiles16 --models 8B --layers full --decode-batches 1,8 --context 1024 --prefill 1024 \
               --hf-models none --small-m-table "$tbl" ${TILES16_AB_ARGS:-}
             [[ -f $tbl ]] && LIMIT_tiles16_shards=${LIMIT_tiles16_shards:-150} run tiles16_shards "${TR1[@]}" \
               bench/bench_e2e.py --tag shards_tiles16 --models "${TILES16_SHARDS:-70B/tp8,70B/tp4,8B/tp2}" --layers full \
               --decode-batches 1 --context 1024 --prefill 1024 --hf-models none --no-fp8 --small-m-table "$tbl" ;;
    accuracy) LIMIT_accuracy=${LIMIT_accuracy:-240} run accuracy "${TR1[@]}" bench/bench_accuracy.py --model 8B \
                --layers full ${ACCURACY_ARGS:-} ;;
    attntail) LIMIT_attntail_bench=${LIMIT_attntail_bench:-150} run attntail_bench python3 \
                bench/bench_decode_attention.py --batches 64 --block-size 256 --contexts 1024,1040,1088,4096,4112 \
                --sweep --sweep-batches 64 --sweep-splits 1 --out-dir "$OUT/attntail" ${ATTNTAIL_BENCH_ARGS:-}
              LIMIT_attntail_ab=${LIMIT_attntail_ab:-200} run attntail_ab "${TR1[@]}" bench/bench_e2e.py \
                --tag tile_ab --models 8B --layers full --decode-batches 32,64 --context 1024 --prefill 1024 \
                --hf-models none --tile-ab ${ATTNTAIL_AB_ARGS:-} ;;
    opf) LIMIT_opf_tests=${LIMIT_opf_tests:-150} run opf_tests bash -c "python3 -m pytest -q -rs tests/test_l2_prefetch.py \
           tests/test_rope_decode_attention.py::test_gpu_next_weight_prefetch_under_pdl \
           tests/distributed/test_model_runtime_gpu.py::test_o_proj_prefetch_decode_same_bits"
         LIMIT_opf_ab=${LIMIT_opf_ab:-240} run opf_ab "${TR1[@]}" bench/bench_e2e.py --tag opf_ab --models 8B \
           --layers full --decode-batches 1,8,64 --context 1024 --prefill 1024 --hf-models none --opf-ab \
           ${OPF_ARGS:-} ;;
    smallm64) LIMIT_smallm64_sweep=${LIMIT_smallm64_sweep:-270} run smallm64_sweep python3 bench/tune_small_gemm.py \
                --models 8B --m 32,64 --budget-s 240 --base-sweep bench/results/small_gemm_h100_14a3f4c.json \
                --out-dir "$OUT/smallm64" ${SMALLM64_SWEEP_ARGS:-}
              tbl="$OUT/smallm64/small_m_gemm_$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"sm{m}{n}")').json"
              [[ -f $tbl ]] && LIMIT_smallm64_ab=${LIMIT_smallm64_ab:-240} run smallm64_ab "${TR1[@]}" bench/bench_e2e.py \
                --tag smallm64 --models 8B --layers full --decode-batches 32,64 --context 1024 --prefill 1024 \
                --hf-models none --small-m-table "$tbl" ${SMALLM64_AB_ARGS:-} ;;
    load) run load python3 bench/bench_load.py --shape 8B ${LOAD_ARGS:-}
          run load_fp8 python3 bench/bench_load.py --shape 8B --fp8 ${LOAD_ARGS:-} ;;  # TP=1; writes /tmp ckpts
    decode_attn) [[ -f bench/bench_decode_attention.py ]] && run decode_attn python3 bench/bench_decode_attention.py ${DECODE_ATTN_ARGS:-} ;;
    profile) run profile "${TR2[@]}" bench/profile_decode.py ${PROFILE_ARGS:-} ;;
    ncu) mkdir -p "$OUT/ncu"  # the inner bash reads NCU_PROFILES, NCU_KERNELS, NCU_COUNT and OUT from the environment
         NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)}; export NCU
         LIMIT_ncu=${LIMIT_ncu:-300} run ncu bash -c 'for p in ${NCU_PROFILES:-8B/tp2:1 8B:16}; do
           IFS=: read -r m b <<< "$p"; tag=${m//\//-}_b$b; echo "== $p"
           "$NCU" --clock-control none --target-processes all --set full --import-source no \
             -k "regex:${NCU_KERNELS:-rope_split|_combine_kernel|small_m_gemm|add_rmsnorm}" \
             --launch-count "${NCU_COUNT:-40}" -f -o "$OUT/ncu/$tag" \
             python3 -m torch.distributed.run --standalone --nproc-per-node=1 bench/profile_decode.py \
             --model "$m" --layers 2 --vocab 32000 --batch "$b" --steps 2 --replay-only || exit 1
           "$NCU" --import "$OUT/ncu/$tag.ncu-rep" --page details --csv > "$OUT/ncu/$tag.csv" || exit 1
           "$NCU" --import "$OUT/ncu/$tag.ncu-rep" --page details > "$OUT/ncu/$tag.txt" || exit 1
           python3 bench/tools/ncu_summary.py "$OUT/ncu/$tag.csv" \
             "$OUT/ncu/ncu_decode_$(python3 -c "import sys; sys.path.insert(0, \"bench\"); import common; print(common.device_slug())")_${m//[^A-Za-z0-9]/}_b$b.json" \
             --commit "${TPFUSE_COMMIT:-unknown}" --model "$m" --batch "$b" \
             --device "$(python3 -c "import torch; print(torch.cuda.get_device_name())")" || exit 1
         done' ;;
    profiles) mkdir -p "$OUT/profiles"  # the inner bash reads PROFILES and OUT from the environment
              LIMIT_profiles=${LIMIT_profiles:-300} run profiles bash -c 'for p in ${PROFILES:-8B:1 8B:8 8B:64 8B:1:fp8 8B:64:fp8 70B/tp8:1}; do
                IFS=: read -r m b f <<< "$p"; echo "== $p"
                OUT=$OUT/profiles python3 -m torch.distributed.run --standalone --nproc-per-node=1 \
                  bench/profile_decode.py --model "$m" --layers full --batch "$b" ${f:+--fp8} || exit 1
              done' ;;
    local) [[ -f bench/bench_local.py ]] && run local python3 bench/bench_local.py ${LOCAL_ARGS:-} ;;
    small_gemm) run small_gemm python3 bench/tune_small_gemm.py ${SMALL_GEMM_ARGS:-} ;;
    rope) [[ -f bench/bench_rope.py ]] && run rope python3 bench/bench_rope.py ${ROPE_ARGS:-} ;;
    host) run host bash -c "python3 bench/bench_host.py --out-dir $OUT ${HOST_ARGS:-} && TPFUSE_FAST_LAUNCH=0 python3 bench/bench_host.py --out-dir $OUT --tag _jit_launch ${HOST_ARGS:-} && python3 -m torch.distributed.run --standalone --nproc-per-node=1 bench/bench_host.py --out-dir $OUT --tag _torchrun ${HOST_ARGS:-}" ;;
    tune) tuned="$OUT/thresholds_tp${ngpu}_$(python3 -c 'import sys; sys.path.insert(0,"bench"); import common; print(common.device_slug())').json"
          [[ $ngpu -ge 2 ]] && run tune "${TR2[@]}" bench/tune.py --out "$tuned" ${TUNE_ARGS:-}
          # USE_TUNED=1: the later steps' communicators load the table just tuned (the documented env escape hatch)
          if [[ -n ${USE_TUNED:-} && -f $tuned ]]; then export TPFUSE_THRESHOLDS=$tuned; echo "TPFUSE_THRESHOLDS=$tuned"; fi ;;
    demo) [[ $ngpu -ge 2 ]] && run demo "${TR2[@]}" -m tpfuse.demo ;;
    probe_ce) [[ $ngpu -ge 2 ]] && run probe_ce "${TR2[@]}" bench/probe_ce.py --out "$OUT/probe_ce_tp${ngpu}.json" ;;
    onegpu) xmls=(); tps=(); sharing=timeslice
            [[ -n ${ONEGPU_MPS:-} ]] && mps_start && sharing=mps
            : "${ONEGPU_GROUPS:=$([[ $sharing == mps ]] && echo 2 || echo 1)}"  # time-sliced ranks gain nothing by it
            d=tests/distributed
            tests=${ONEGPU_TESTS:-"$d/test_fused_ar_gpu.py $d/test_async_tp_gpu.py $d/test_fault_gpu.py $d/test_parallelize_gpu.py $d/test_model_runtime_gpu.py $d/test_fp8_model_gpu.py $d/test_soak_gpu.py $d/test_comm_ops.py $d/test_fp8_gemm.py $d/test_small_m_model.py $d/test_fault_catalog.py"}
            for tp in ${ONEGPU_TP:-2}; do
              kvar="ONEGPU_K_$tp"; kk=${!kvar:-${ONEGPU_K:-}}
              k="onegpu${kk:+ and ($kk)}"; targets=$tests
              if [[ -n ${ONEGPU_TODO:-} ]]; then  # only what bench/results has not seen pass at this TP
                TPFUSE_TEST_TP="$tp" python3 -m pytest --collect-only -q -p no:cacheprovider -k "$k" $tests \
                  > "$OUT/collect_tp$tp.log" 2>&1; crc=$?
                # 5: nothing collected (the -k filter left nothing); anything else non-zero: a file did not collect
                if [[ $crc -ne 0 && $crc -ne 5 ]]; then
                  echo "TP=$tp: collection failed (rc=$crc), see collect_tp$tp.log"; tail -n 15 "$OUT/collect_tp$tp.log"
                  status=1; continue
                fi
                python3 bench/tools/onegpu_coverage.py --todo "$tp" ${ONEGPU_AFTER:+--after "$ONEGPU_AFTER"} \
                  < "$OUT/collect_tp$tp.log" > "$OUT/todo_tp$tp.txt"
                targets=$(tr '\n' ' ' < "$OUT/todo_tp$tp.txt"); echo "TP=$tp todo: $(wc -l < "$OUT/todo_tp$tp.txt") tests"
                [[ -z ${targets// /} ]] && continue
              fi
              if [[ -n ${ONEGPU_TODO:-} ]]; then mapfile -t target_list < "$OUT/todo_tp$tp.txt"  # one id a line
              else read -r -a target_list <<< "$targets"; fi
              onegpu_tp "$tp" "$k" "${target_list[@]}"
            done
            [[ $sharing == mps ]] && mps_stop
            [[ ${#xmls[@]} -gt 0 ]] && python3 bench/tools/junit_summary.py --sharing $sharing --out "$OUT/onegpu_suite_$(python3 -c 'import sys; sys.path.insert(0,"bench"); import common; print(common.device_slug())')_tp$(printf '%s\n' "${tps[@]}" | uniq | paste -sd_).json" --tp "${tps[@]}" -- "${xmls[@]}" ;;
    soak) mps=; [[ -n ${ONEGPU_MPS:-} ]] && mps_start && mps=1
          run soak env TPFUSE_TEST_TP=2 TPFUSE_SOAK_REPLAYS="${SOAK_REPLAYS:-100000}" bash -c "python3 -m pytest -q -rs -s -p no:cacheprovider --junitxml=$OUT/soak_tp2.xml tests/distributed/test_soak_gpu.py"
          [[ -n $mps ]] && mps_stop
          # the replay count and worst error ride in the XML (record_property): onegpu_suite_<device>_soak_tp2.json
          python3 bench/tools/junit_summary.py --sharing "$([[ -n $mps ]] && echo mps || echo timeslice)" --out "$OUT/onegpu_suite_$(python3 -c 'import sys; sys.path.insert(0,"bench"); import common; print(common.device_slug())')_soak_tp2.json" --tp 2 -- "$OUT/soak_tp2.xml" ;;
    probe_onegpu) for tp in ${ONEGPU_TP:-2 4 8}; do
                    run "probe_onegpu_tp$tp" env TPFUSE_ONE_GPU=1 python3 -m torch.distributed.run --standalone --nproc-per-node="$tp" bench/probe_onegpu.py
                  done
                  # PROBE_MPS=1: the same under an MPS daemon of this call's own (stopped after; no GPU setting changes)
                  if [[ -n ${PROBE_MPS:-} ]] && mps_start; then
                    for tp in ${ONEGPU_TP:-2 4 8}; do
                      run "probe_onegpu_mps_tp$tp" env TPFUSE_ONE_GPU=1 python3 -m torch.distributed.run --standalone --nproc-per-node="$tp" bench/probe_onegpu.py --label mps
                    done
                    mps_stop
                  fi ;;
    *) echo "unknown step $s"; status=1 ;;
  esac
done
ls -la "$OUT"
# the device tool returns at most 8 files: pack everything into one archive when there are more
if [[ $(find "$OUT" -maxdepth 1 -type f | wc -l) -gt 7 ]]; then
  tar czf /tmp/gpu_run.tgz -C "$OUT" . && find "$OUT" -maxdepth 1 -type f -delete && mv /tmp/gpu_run.tgz "$OUT/" && echo "packed into $OUT/gpu_run.tgz"
fi
exit $status
