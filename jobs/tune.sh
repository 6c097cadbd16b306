#!/usr/bin/env bash
# jobs/tune.sh [corte-ray tune options]: a Ray Tune sweep of adapt runs, as a Ray job.
#
# Submits `corte-ray tune ...` to the cluster at $RAY_ADDRESS; --max-concurrent trials run at once, each
# reserving scaling.num_workers x (scaling.cpus_per_worker [+ 1 GPU]) + scaling.data_cpus.
#
#   jobs/tune.sh --config my.yaml --space corte --samples 16 --max-concurrent 4 --out s3://bucket/sweeps/s1 \
#       scaling.use_gpu=true scaling.wait_for_gpus=true
#   jobs/tune.sh --out s3://bucket/sweeps/s1 --resume
#
# Environment: RAY_ADDRESS (required), CORTE_JOB_ENV, CORTE_SUBMIT_ARGS, CORTE_WORKING_DIR (see jobs/submit.sh).
exec env CORTE_JOB_SCRIPT="${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/submit.sh" tune "$@"
