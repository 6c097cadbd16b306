#!/usr/bin/env bash
# jobs/adapt.sh [corte-ray adapt options]: adapt a student on the target domain, as a Ray job.
#
# Submits `corte-ray adapt ...` to the cluster at $RAY_ADDRESS: Ray Train workers (scaling.num_workers, one GPU
# each with scaling.use_gpu=true) fed by a Ray Data stream. On an autoscaling cluster whose GPU nodes start at 0,
# add scaling.wait_for_gpus=true so the job waits for them instead of refusing at once.
#
#   jobs/adapt.sh --method corte --dataset cityscapes --root s3://bucket/cityscapes \
#       --label-store s3://bucket/labels/cs-train --out s3://bucket/runs/corte-1 \
#       scaling.num_workers=4 scaling.use_gpu=true scaling.wait_for_gpus=true
#   jobs/adapt.sh --out s3://bucket/runs/corte-1 --resume      # continue after a failure
#
# Environment: RAY_ADDRESS (required), CORTE_JOB_ENV, CORTE_SUBMIT_ARGS, CORTE_WORKING_DIR (see jobs/submit.sh).
exec env CORTE_JOB_SCRIPT="${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/submit.sh" adapt "$@"
