#!/usr/bin/env bash
# Issue 20: one socket-load spec against several commits of the code in one device call, so that a
# difference between sessions can be told from the run-to-run spread (same machine, same run).
# Here, before the call: for c in HEAD 79b6b4b; do mkdir -p ab/$c && git archive $c breeze_stream engines
#   streaming bench web pyproject.toml | tar -x -C ab/$c; done   (ab/ is not committed; ~9.4 MB a commit)
# On the device: bash bench/gpu/compare_commits.sh "TAG:SERVE ARGS|N"   (carry ab .whl .dev: ab/ is git-ignored here)
# Each commit's own socket_load.sh runs the spec; results under $OUT/<commit>/.
set -u
O=$OUT
for dir in ab/*/; do
  commit=$(basename "$dir")
  (cd "$dir" && ln -sfn ../../.whl .whl && ln -sfn ../../.dev .dev &&
   OUT=$O/$commit DURATION=${DURATION:-30} WARM_STREAMS=${WARM_STREAMS:-100} WARM_S=${WARM_S:-10} \
     bash bench/gpu/socket_load.sh "${1/:/-$commit:}")
done
nvidia-smi --query-gpu=name --format=csv,noheader
