#!/usr/bin/env bash
# jobs/evaluate.sh [corte-ray evaluate options]: mIoU of a folder of predictions, as a Ray job.
#
# Submits `corte-ray evaluate ...` to the cluster at $RAY_ADDRESS (it runs on the head, beside the data).
# Predictions come from `corte-ray predict CHECKPOINT ...`, which CORTE_STEP=predict submits the same way.
#
#   jobs/evaluate.sh --dataset cityscapes --root /data/cityscapes --predictions /data/preds/corte-1 \
#       --json /data/preds/corte-1/miou.json
#   CORTE_STEP=predict jobs/evaluate.sh RUN/checkpoints/best --dataset cityscapes --root /data/cityscapes \
#       --out /data/preds/corte-1
#
# Environment: RAY_ADDRESS (required), CORTE_JOB_ENV, CORTE_SUBMIT_ARGS, CORTE_WORKING_DIR (see jobs/submit.sh).
exec env CORTE_JOB_SCRIPT="${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/submit.sh" "${CORTE_STEP:-evaluate}" "$@"
