#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod): create it, copy this checkout to every
# worker, install, run the same experiments.train command on all workers, stream their logs,
# and delete the slice at the end. See launch/README.md.
#
#   TPU_NAME=attn-jax-v5e16 ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 \
#   RUNTIME_VERSION=v2-alpha-tpuv5-lite WORKDIR=gs://my-bucket/runs/lm1b \
#   launch/tpu_pod.sh --config=experiments/configs/lm1b.py --config.data.data_dir=gs://my-bucket/tfds
#
# Arguments are passed to experiments.train, after --workdir=$WORKDIR and --distributed=jax
# (JAX's cluster detection finds the slice's workers through the metadata server).
#
# Environment:
#   TPU_NAME, ZONE, ACCELERATOR_TYPE, RUNTIME_VERSION   the slice (required)
#   WORKDIR          checkpoints and metrics; a gs:// path, so that every worker sees it (required)
#   PROJECT          gcloud project (default: gcloud's configured one)
#   MODE             create (default): tpu-vm create; queued: a queued resource (waits for capacity);
#                    existing: use a running slice as it is
#   SPOT=1           spot capacity (preemptible; the run saves on SIGTERM and is resumed below)
#   KEEP=1           do not delete the slice at the end
#   MAX_RESTARTS     how many times to resume after a preemption (exit status 143), default 3
#   EXTRAS           pip extras to install, default "experiments"
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (a gs:// path)}"
MODE=${MODE:-create}
SPOT=${SPOT:-0}
KEEP=${KEEP:-0}
MAX_RESTARTS=${MAX_RESTARTS:-3}
EXTRAS=${EXTRAS:-experiments}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
GC=(gcloud --project="$PROJECT")
TPU=("${GC[@]}" compute tpus tpu-vm)

cleanup() {
  if [[ "$KEEP" == 1 || "$MODE" == existing ]]; then
    echo "[tpu_pod] keeping $TPU_NAME (KEEP=1 or MODE=existing)"
    return
  fi
  echo "[tpu_pod] deleting $TPU_NAME"
  if [[ "$MODE" == queued ]]; then
    "${GC[@]}" compute tpus queued-resources delete "$TPU_NAME-qr" --zone="$ZONE" --force --quiet || true
  else
    "${TPU[@]}" delete "$TPU_NAME" --zone="$ZONE" --quiet || true
  fi
}

spot_flag=()
[[ "$SPOT" == 1 ]] && spot_flag=(--spot)
case "$MODE" in
  create)
    : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE}" "${RUNTIME_VERSION:?set RUNTIME_VERSION}"
    trap cleanup EXIT
    "${TPU[@]}" create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${spot_flag[@]}"
    ;;
  queued)
    : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE}" "${RUNTIME_VERSION:?set RUNTIME_VERSION}"
    trap cleanup EXIT
    "${GC[@]}" compute tpus queued-resources create "$TPU_NAME-qr" --node-id="$TPU_NAME" \
      --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
      "${spot_flag[@]}"
    echo "[tpu_pod] waiting for the queued resource to become ACTIVE"
    while true; do
      state=$("${GC[@]}" compute tpus queued-resources describe "$TPU_NAME-qr" --zone="$ZONE" \
        --format='value(state.state)')
      [[ "$state" == ACTIVE ]] && break
      if [[ "$state" == FAILED || "$state" == SUSPENDED ]]; then
        echo "[tpu_pod] queued resource is $state" >&2
        exit 1
      fi
      sleep 30
    done
    ;;
  existing) ;;
  *) echo "MODE must be create, queued or existing, got $MODE" >&2; exit 2 ;;
esac

# Copy the tracked files of this checkout (not venvs or outputs) to every worker and install.
archive=$(mktemp -t attn_jax.XXXXXX.tgz)
git -C "$REPO" ls-files -z | tar -C "$REPO" --null -T - -czf "$archive"
"${TPU[@]}" scp "$archive" "$TPU_NAME":attn_jax.tgz --zone="$ZONE" --worker=all
rm -f "$archive"
"${TPU[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="set -e
  rm -rf attn_jax && mkdir attn_jax && tar -xzf attn_jax.tgz -C attn_jax
  cd attn_jax && python3 -m venv .venv && . .venv/bin/activate
  pip install -q -U pip && pip install -q '.[$EXTRAS]' 'jax[tpu]' google-cloud-storage gcsfs"

# Every worker runs the same command; gcloud streams all their outputs here. A preempted run
# (SIGTERM: checkpoint saved, exit status 143) is started again and resumes from WORKDIR.
args=$(printf ' %q' "$@")
for attempt in $(seq 0 "$MAX_RESTARTS"); do
  set +e
  "${TPU[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="cd attn_jax && . .venv/bin/activate &&
    python -m experiments.train --workdir=$WORKDIR --distributed=jax$args"
  status=$?
  set -e
  [[ $status == 143 ]] || break
  echo "[tpu_pod] preempted (attempt $attempt); resuming from $WORKDIR"
done
exit "$status"
