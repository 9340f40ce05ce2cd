#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, as run on an H100 (see RESULTS.md for the
# environment). Usage: bash benchmarks/gpu.sh [throughput|mfu|autotune|micro_batch|profile|train|step_sync|one_gpu_ddp|fsdp|checkpoint|data|suite] ; logs go to $OUT (default ./gpu-logs).
#   throughput: train_throughput.py, clip_pl against OpenCLIP (ViT-B/16, micro-batches, RN50)
#   mfu:        ViT-B/16 eager and compiled (also with CUDA graphs) against OpenCLIP, with device time
#               by kernel kind (where the step's time goes, and the MFU ceiling of its matrix products)
#   autotune:   ViT-B/16 compiled, default against max-autotune (minutes of autotuning)
#   micro_batch: batch 512 in pieces of 128, clip_pl's micro_batch_size against OpenCLIP's accum_freq
#   profile:    train.py compiled, with Lightning's simple profiler (where a step's time goes)
#   train:      train.py end to end (Lightning, the real input pipeline on generated shards, bf16),
#               eager and compiled
#   step_sync:  train.py compiled with and without the progress bar (a wait for the GPU every step)
#   one_gpu_ddp: train.py compiled on one GPU inside DDP and without it
#   fsdp:       train.py with ViT-L/14 (bf16, batch 64) on one GPU, without and with trainer=fsdp:
#               samples/s and peak memory, the overhead of FSDP2 where it has nothing to shard across
#   checkpoint: how long training stops to save ViT-B/16's checkpoint, in the training thread or not
#   data:       the input pipeline alone on this machine's cores
#   suite:      the DataComp evaluation suite's images/s and prompts/s for ViT-B/32 and ViT-L/14 in
#               bf16, and its wall time from them
set -euo pipefail
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bench="python3 benchmarks/train_throughput.py --device cuda --precision bf16"

throughput() {
    $bench --model vit_b16 --batch-size 256 --warmup 5 --steps 20 --rounds 3 --breakdown-steps 2 \
        --variants clip_pl openclip clip_pl:compile openclip:compile clip_pl:patch_dropout openclip:patch_dropout \
        2>&1 | tee "$OUT/vit_b16.txt"
    micro_batch
    $bench --model rn50 --batch-size 256 --warmup 5 --steps 20 --rounds 3 --breakdown-steps 2 \
        --variants clip_pl openclip openclip:channels_last 2>&1 | tee "$OUT/rn50.txt"
}

micro_batch() {
    $bench --model vit_b16 --batch-size 512 --micro-batch-size 128 --warmup 3 --steps 5 --rounds 2 --breakdown-steps 1 \
        --variants openclip clip_pl clip_pl:micro_batch openclip:micro_batch 2>&1 | tee "$OUT/micro_batch.txt"
}

mfu() {
    $bench --model vit_b16 --batch-size 256 --warmup 5 --steps 20 --rounds 3 --breakdown-steps 2 --profile 3 \
        --variants clip_pl openclip clip_pl:compile openclip:compile clip_pl:compile+cudagraphs \
        --json "$OUT/mfu.json" 2>&1 | tee "$OUT/mfu.txt"
}

autotune() {
    # Autotuning compiles and times many kernels per matrix shape; 240 s after mfu's run was not
    # enough for the backward (RESULTS.md, A), so it has a call of its own.
    timeout 540 $bench --model vit_b16 --batch-size 256 --warmup 3 --steps 10 --rounds 2 --breakdown-steps 0 \
        --profile 2 --variants clip_pl:compile clip_pl:compile+autotune 2>&1 | tee "$OUT/mfu_autotune.txt"
}

shards() {
    # 2000 generated samples (256-512 px JPEGs) and their tokenizer, in .cache/bench_shards.
    python3 -c "from benchmarks.data_throughput import ensure_dataset, DEFAULT_CACHE; ensure_dataset(DEFAULT_CACHE, 2000, 250)"
}

train_vit_b16() {  # train_vit_b16 RUN_DIR [overrides...]
    local run_dir=$1
    shift
    python3 train.py model=vit_b16 data=webdataset trainer=gpu trainer.devices=1 logger=csv callbacks.pictures=null \
        "data.train_shards='.cache/bench_shards/shards/{00000..00007}.tar'" tokenizer.path=.cache/bench_shards/tok.model \
        data.batch_size=256 data.num_workers=14 data.samples_per_epoch=10000000 optim.warmup_steps=10 \
        trainer.max_steps=300 trainer.log_every_n_steps=10 checkpoint.every_n_steps=100000 \
        run_dir="$run_dir" trainer.enable_progress_bar=false "$@"
}

profile() {
    shards
    train_vit_b16 "$OUT/profile" module.compile=true +trainer.profiler=simple 2>&1 | grep -v "It is recommended" \
        > "$OUT/profile.txt"
    grep -E "Action|Total|run_training_batch|train_dataloader_next|optimizer_step|training_step|backward|batch_to_device|on_train_batch" \
        "$OUT/profile.txt" | cut -c1-60,170-280

}

summary() {
    # The medians of what train.py's speed monitor logged over the last 100 of its 300 steps.
    python3 - "$1" <<'PY' | tee -a "$OUT/train.txt"
import csv, glob, statistics, sys
rows = list(csv.DictReader(open(glob.glob(f"{sys.argv[1]}/csv/version_*/metrics.csv")[0])))
last = [r for r in rows if r.get("train/samples_per_sec")][-10:]
rate = statistics.median(float(r["train/samples_per_sec"]) for r in last)
wait = statistics.median(float(r["train/data_wait_fraction"]) for r in last)
mfu = statistics.median(float(r["train/mfu"]) for r in last)
print(f"{sys.argv[1]}: train.py samples/s {rate:.1f}, MFU {100 * mfu:.1f}% (medians of logged steps {last[0]['step']}-{last[-1]['step']}), data wait {100 * wait:.1f}% of step time")
PY
}

compare() {  # compare KEY VALUE... : train.py compiled, once per value of the override KEY
    local key=$1
    shift
    shards
    for value in "$@"; do
        train_vit_b16 "$OUT/train_${key##*.}_$value" module.compile=true "$key=$value" 2>&1 | tail -2
        summary "$OUT/train_${key##*.}_$value"
    done
}

train() { compare module.compile false true; }

# With the progress bar, Lightning reads the loss back from the GPU at every step; without it
# there is no read outside the logging steps: what one wait for the GPU per step costs.
step_sync() { compare trainer.enable_progress_bar true false; }

# One GPU inside DDP (what trainer=gpu once did: gradients copied through
# DDP's buckets, the model compiled as one graph per bucket) and without it.
one_gpu_ddp() { compare trainer.strategy ddp auto; }

fsdp() {
    shards
    for trainer in gpu fsdp; do
        train_vit_b16 "$OUT/fsdp_$trainer" model=vit_l14 trainer=$trainer trainer.devices=1 data.batch_size=64 \
            trainer.max_steps=100 '+callbacks.device_stats={_target_: lightning.pytorch.callbacks.DeviceStatsMonitor}' \
            2>&1 | tail -2
        summary "$OUT/fsdp_$trainer"
        python3 - "$OUT/fsdp_$trainer" <<'PY' | tee -a "$OUT/train.txt"
import csv, glob, sys
rows = list(csv.DictReader(open(glob.glob(f"{sys.argv[1]}/csv/version_*/metrics.csv")[0])))
peak = max(float(v) for r in rows for k, v in r.items() if k.endswith("allocated_bytes.all.peak") and v)
print(f"{sys.argv[1]}: peak GPU memory allocated {peak / 2**30:.1f} GiB")
PY
    done
}

checkpoint() {
    # How long training stops to save ViT-B/16's checkpoint from the GPU: written in the training
    # thread, and in the background after a copy to pinned host memory.
    python3 benchmarks/checkpoint_save.py --model vit_b16 --device cuda --rounds 5 2>&1 | tee "$OUT/checkpoint.txt"
}

data() {
    python3 benchmarks/data_throughput.py --workers 1 4 8 --pipelines clip_pl openclip --rounds 2 --batches 20 \
        --batch-size 256 2>&1 | tee "$OUT/data_16cores.txt"
}

suite() {
    for model in vit_b32 vit_l14; do
        python3 benchmarks/suite_time.py --model "$model" --device cuda --images 4096 --prompt-classes 1000 \
            --batch-size 256 --num-workers 12 2>&1 | tee "$OUT/suite_$model.txt"
    done
}

"${1:-throughput}"
