#!/usr/bin/env bash
# The entrypoint of configs/kuberay-rayjob.yaml: `clpd run CONFIG` on the job's Ray cluster, with
# the run directory in storage at $CLPD_OUT/<UTC time>-<config name> (a new one per job), run
# from $CLPD_WORKDIR when set.
# Kept in a script so the command line needs no quoting through KubeRay's submitter shell,
# `ray job submit` and the job's own shell; $CLPD_OUT is read here, in the job's environment.
set -euo pipefail
config="${1:?usage: rayjob-entrypoint.sh CONFIG [clpd run options]}"
shift
out="${CLPD_OUT:?set CLPD_OUT to the storage prefix for runs, e.g. s3://my-bucket/clpd}"
# CLPD_WORKDIR: run from there (the config's relative model paths then name the same directory
# on every node, e.g. a volume mounted at $CLPD_WORKDIR/models on every pod).
if [[ -n "${CLPD_WORKDIR:-}" ]]; then
    config="$(realpath "$config")"
    cd "$CLPD_WORKDIR"
fi
exec clpd run "$config" --address auto --out "${out%/}/$(date -u +%Y%m%d-%H%M%S)-$(basename "$config" .yaml)" "$@"
