#!/usr/bin/env bash
# Issue 24: Medusa heads for Breeze-ASR-25's shape on one GPU. `train-medusa --model random:large-v2`
# (random weights of Breeze's exact shape; the real weights train the same way) labels CLIPS
# synthetic clips (tones, chirps and noise written here: no data files), trains 4 heads x 4 blocks
# for one epoch, then resumes its checkpoint for a second epoch on the cached labels. Prints the
# labelling time per clip, ms per training step, peak GPU memory and checks the resume; under 120 s.
# Usage on the device: bash bench/gpu/medusa_breeze.sh
# Dry run on a CPU with the project installed: LOCAL=1 OUT=/tmp/mb MODEL=random:tiny DEVICE=cpu bash bench/gpu/medusa_breeze.sh
source bench/gpu/common.sh
set -e
MODEL=${MODEL:-random:large-v2}
DEVICE=${DEVICE:-cuda}
CLIPS=${CLIPS:-64}
WORK=$(mktemp -d)
python3 - "$WORK/clips" "$CLIPS" <<'PY'
import sys, wave
from pathlib import Path
import numpy as np
folder, n = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True)
rng = np.random.default_rng(0)
for i in range(n):
    t = np.arange(int(rng.uniform(3, 12) * 16000)) / 16000
    f0 = rng.uniform(100, 300) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))  # a gliding tone
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16000) + 0.05 * rng.standard_normal(len(t))
    with wave.open(str(folder / f"{i:03d}.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
PY
train() {  # train EPOCHS [--resume]: one train-medusa run, its log in $OUT/r
  python3 -m engines.medusa_train --model "$MODEL" --device "$DEVICE" --audio "$WORK/clips" \
    --out "$WORK/heads.safetensors" --heads 4 --layers 4 --epochs "$@" --max-tokens ${TOKENS:-48} \
    --label-batch 16 --batch-size 512 --verify 0 --holdout 0.1 > "$OUT/r/train-$1.json" 2> "$OUT/r/train-$1.log"
}
t0=$SECONDS
train 1
echo "run 1 (label + epoch 1): $((SECONDS - t0)) s"
grep -a -o "labels: 100%[^]]*]" "$OUT/r/train-1.log" | tail -1 || true
grep -a "ms/step" "$OUT/r/train-1.log"
t1=$SECONDS
train 2 --resume
echo "run 2 (resume, epoch 2): $((SECONDS - t1)) s"
grep -a "resumed from" "$OUT/r/train-2.log" || { echo "FAIL: run 2 did not resume"; tail -20 "$OUT/r/train-2.log"; exit 1; }
grep -a -q "^labelling" "$OUT/r/train-2.log" && { echo "FAIL: run 2 labelled again"; exit 1; }
grep -a "ms/step" "$OUT/r/train-2.log"
python3 - "$OUT/r/train-1.json" "$OUT/r/train-2.json" "$WORK/heads.safetensors" <<'PY'
import json, sys
from engines.medusa import read_heads_meta
for path in sys.argv[1:3]:
    s = json.loads(open(path).read().strip().splitlines()[-1])
    print(f"{path.rsplit('/', 1)[-1]}: {s['clips']} clips, {s['positions']} positions, labels {s['label_seconds']} s, "
          f"training {s['train_seconds']} s, total {s['total_seconds']} s; peak GPU memory: frozen model and labels "
          f"{s['peak_gpu_gib_model']} GiB, heads training {s['peak_gpu_gib_training']} GiB")
meta = read_heads_meta(sys.argv[3])
print(f"heads: n_state {meta['n_state']}, {meta['n_heads']} heads x {meta['n_layers']} blocks, epochs {meta['epochs']}, "
      f"base model {meta['base_model']}")
assert meta["epochs"] == "2", meta["epochs"]
PY
echo "medusa_breeze: OK in $SECONDS s"
rm -rf "$WORK"
bundle
