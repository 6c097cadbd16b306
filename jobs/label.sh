#!/usr/bin/env bash
# jobs/label.sh [corte-ray label options]: label the target images with the black box, as a Ray job.
#
# Submits `corte-ray label --engine ray ...` to the cluster at $RAY_ADDRESS: a Ray Data job whose actor pool
# (--actors N, --gpus-per-actor G) queries the box once per image and writes the label store. An http(s) box's
# token comes from $CORTE_BLACKBOX_TOKEN here and reaches the actors through the job's runtime env.
#
#   export RAY_ADDRESS=http://127.0.0.1:8265 CORTE_BLACKBOX_TOKEN=...
#   jobs/label.sh --dataset cityscapes --root s3://bucket/cityscapes --split train \
#       --blackbox https://vendor.example/seg --out s3://bucket/labels/cs-train --actors 4
#
# Environment: RAY_ADDRESS (required), CORTE_JOB_ENV, CORTE_SUBMIT_ARGS, CORTE_WORKING_DIR (see jobs/submit.sh).
exec env CORTE_JOB_SCRIPT="${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/submit.sh" label "$@"
