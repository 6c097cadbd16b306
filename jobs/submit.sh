#!/usr/bin/env bash
# jobs/submit.sh STEP [ARGS...]: submit `corte-ray STEP ARGS...` as a Ray job to the cluster at $RAY_ADDRESS.
#
# The per-step scripts (jobs/label.sh, adapt.sh, tune.sh, evaluate.sh) call this; use them. It runs
#   ray job submit --address $RAY_ADDRESS --working-dir <repo> --runtime-env <file> $CORTE_SUBMIT_ARGS \
#       -- corte-ray STEP ARGS...
# and waits for the job, streaming its log (exit code 0 when the job succeeded, 1 when it failed).
#
# Environment:
#   RAY_ADDRESS        (required) the cluster's job API, e.g. http://127.0.0.1:8265 through
#                      `ray dashboard cluster.yaml` (an SSH tunnel to the head).
#   CORTE_JOB_ENV      names of environment variables to hand to the job, comma-separated (default:
#                      CORTE_BLACKBOX_TOKEN). Each one set here reaches the driver and every worker and actor
#                      of the job through the job's runtime env (env_vars): secrets such as the HTTP black box
#                      token never appear in argv, in this script's output or in the job's log. Add e.g.
#                      AWS_REGION here; give nodes cloud credentials through their instance role instead.
#   CORTE_SUBMIT_ARGS  extra `ray job submit` options, e.g. "--no-wait --submission-id label-1" or
#                      "--entrypoint-num-cpus 1".
#   CORTE_WORKING_DIR  the directory uploaded as the job's working dir and cwd (default: this repository).
#                      Relative paths in ARGS are read there, on the cluster: use s3://, gs:// or node paths.
#
# Afterwards: ray job logs ID, ray job status ID, ray job stop ID (ID is printed at submission), ray job list.
# Note: Ray itself shows a job's runtime env, env_vars included, in `ray job list` and the state API (to whoever
# can reach the job API: keep it behind the SSH tunnel; the dashboard redacts them for browsers) and in each
# node's runtime_env_agent.log (see the start commands in cluster.yaml).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
caller="${CORTE_JOB_SCRIPT:-$here/submit.sh}"

usage() {  # the header comment of the calling script, without the '#'
  sed -n '2,/^[^#]/{/^#/!d; s/^# \{0,1\}//; p}' "$caller"
}

case "${1:-}" in
  "") usage >&2; exit 2 ;;
  -h|--help) usage; exit 0 ;;
esac
step="$1"; shift
case "${1:-}" in
  -h|--help) usage; echo; echo "The options of the step itself: corte-ray $step --help"; exit 0 ;;
esac
name="jobs/$(basename "$caller")"
if [ -z "${RAY_ADDRESS:-}" ]; then
  echo "$name: RAY_ADDRESS is not set: point it at the cluster's job API, e.g." >&2
  echo "  ray dashboard cluster.yaml &   # tunnels the head's port 8265 to this machine" >&2
  echo "  export RAY_ADDRESS=http://127.0.0.1:8265" >&2
  exit 2
fi
if ! command -v ray >/dev/null 2>&1; then
  echo "$name: the ray command is not on PATH; install the cluster's Ray here: pip install 'ray[default]==2.60.0'" >&2
  exit 2
fi
python="$(command -v python3 || command -v python)"

# The runtime env goes in a file only this user can read (mktemp creates it 0600), removed on exit: on the
# command line (--runtime-env-json) the token would be in argv, visible to every user of this machine.
env_file="$(mktemp "${TMPDIR:-/tmp}/corte-runtime-env.XXXXXX")"
trap 'rm -f "$env_file"' EXIT
CORTE_JOB_ENV="${CORTE_JOB_ENV-CORTE_BLACKBOX_TOKEN}" "$python" - "$env_file" <<'PY'
import json
import os
import sys

names = [n.strip() for n in os.environ["CORTE_JOB_ENV"].split(",") if n.strip()]
env_vars = {n: os.environ[n] for n in names if os.environ.get(n)}
env_vars.setdefault("CORTE_NO_PROGRESS", "1")  # plain progress lines in the job log, no terminal bars
doc = {"env_vars": env_vars,
       # Not uploaded with the working dir: history, caches and local outputs.
       "excludes": [".git", "**/__pycache__", ".venv", "*.egg-info", ".pytest_cache", "demo_out", "runs",
                    "tune_out"]}
with open(sys.argv[1], "w") as f:
    json.dump(doc, f)
sent = sorted(n for n in env_vars if n != "CORTE_NO_PROGRESS")
missing = [n for n in names if n not in env_vars]
print(f"runtime env: env_vars {', '.join(sent) or '(none)'} (values not shown)"
      + (f"; not set here: {', '.join(missing)}" if missing else ""), file=sys.stderr)
PY

# shellcheck disable=SC2086  # CORTE_SUBMIT_ARGS is a list of options on purpose
ray job submit --address "$RAY_ADDRESS" --working-dir "${CORTE_WORKING_DIR:-$(dirname "$here")}" \
  --runtime-env "$env_file" ${CORTE_SUBMIT_ARGS:-} -- corte-ray "$step" "$@"
