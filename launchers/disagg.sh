#!/usr/bin/env bash
# Start a disaggregated prefill/decode topology: N vLLM prefillers, M vLLM decoders, K pool
# engines (kv_both: either role, per request) and pdproxy in front of them. One entry point for the NIXL and LMCache connectors, GPU or CPU.
# Ctrl+C, SIGTERM or any exit stops everything this script started.
set -euo pipefail

LAUNCHER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$LAUNCHER_DIR")
# shellcheck source=launchers/lib.sh
source "$LAUNCHER_DIR/lib.sh"

usage() {
  cat <<'EOF'
Usage: launchers/disagg.sh --model PATH_OR_NAME [options] [-- extra vLLM engine args]

Topology
  --prefill N              prefill instances (default 1; 0 with --pool)
  --decode M               decode instances (default 1; 0 with --pool)
  --pool K                 pool engines: NixlConnector kv_role kv_both, each prefilling for
                           others or decoding as the proxy's pool planner decides per request;
                           alone or beside --prefill/--decode (default 0)
  --pool-connector nixl|none  none: plain engines without a KV connector, for
                           --pool-mode colocated (default nixl)
  --pool-mode adaptive|colocated  the proxy's pool_mode (default adaptive; colocated with
                           --pool-connector none): colocated serves every request whole on one
                           engine, the no-PD baseline
  --connector nixl|lmcache KV-transfer connector (default nixl)
  --prefill-tp T           tensor-parallel size of each prefiller (default 1)
  --decode-tp T            tensor-parallel size of each decoder (default 1)
  --pool-tp T              tensor-parallel size of each pool engine (default 1)
  --device cuda|cpu        cuda (default) or the vLLM CPU build (float32, eager, one core each)
  --prefill-gpus LIST      GPU ids for prefillers, TP-sized slices in order (e.g. 0,1)
  --decode-gpus LIST       GPU ids for decoders (default: the ids after the prefillers')
  --pool-gpus LIST         GPU ids for pool engines (default: the ids after the decoders')
  --cpus N                 cores to spread CPU instances over (default: nproc)
  --cpu-kvcache-gib G      VLLM_CPU_KVCACHE_SPACE per CPU instance (default 1)

Ports and addresses
  --host ADDR              address every component listens on and advertises (default 127.0.0.1)
  --proxy-port P           proxy port (default 9100)
  --prefill-port P         first prefiller HTTP port, +i per instance (default 7100)
  --decode-port P          first decoder HTTP port, +i per instance (default 7200)
  --pool-port P            first pool engine HTTP port, +i per instance (default 7600)
  --side-channel-port P    NIXL side channel: prefiller i P+10i, decoder j P+100+10j, pool
                           engine k P+200+10k (default 5600)
  --lmcache-init-port P    LMCache receiver init port of decoder rank 0 (default 7300)
  --lmcache-alloc-port P   LMCache receiver alloc port of decoder rank 0 (default 7400)
  --notify-port P          proxy's LMCache notification (ZMQ PULL) port (default 7500)
  --ucx-tls LIST           export UCX_TLS to every engine (default: leave UCX to choose)

KV transfer
  --ucx-get-zcopy y|auto|n UCX_CUDA_IPC_ENABLE_GET_ZCOPY of every engine on cuda (default y, or the
                           value already in the environment): y lets UCX's cuda_ipc transport do
                           GPU-to-GPU reads, the NixlConnector's pull; auto leaves it to UCX, which
                           allows them only where NVML reports NVLink (else the pull runs over TCP)
  --block-size N           KV-cache block size in tokens of every engine (vLLM --block-size)
  --prefill-block-size N   ... of the prefillers only
  --decode-block-size N    ... of the decoders only
  --nixl-threads N         NixlConnector num_threads (kv_connector_extra_config; vLLM's default 4)
  --cross-layer-blocks     NixlConnector enable_cross_layers_blocks: one region per block for all
                           layers, so a pull moves ~64x fewer, larger pieces (default on cuda). vLLM
                           allocates them on its V1 model runner only, so the launcher also sets
                           VLLM_USE_V2_MODEL_RUNNER=0 for KV engines unless it is set already
                           (H200, 8B: a 2000-token pull 2.2 ms instead of 39 ms; README)
  --no-cross-layer-blocks  per-layer regions and vLLM's own choice of model runner (default on cpu)
  --kv-buffer-device D     kv_buffer_device: cuda (default on GPUs) or cpu
  --lmcache-buffer-size B  LMCache pd_buffer_size of each decoder in bytes (a number, or with a
                           K/M/G suffix, powers of 1024): its receive buffer must hold the prompts in
                           flight (default the YAML's 2 GiB: ~8 prompts of 2000 tokens of an 8B model)
  --lmcache-alloc-timeout S  LMCache pd_allocation_timeout_sec of each decoder: seconds a push may
                           wait for room in that receive buffer before the decoder drops it (that
                           request gets no notification: the proxy's 504, or its fallback), so a
                           full buffer cannot hold the prefiller forever (default LMCache's: none)
  --kv-extra KEY=VALUE     add KEY to kv_connector_extra_config of every engine (repeatable;
                           VALUE is a number, true/false/null, or a string)
  --prefill-kv-extra KEY=VALUE, --decode-kv-extra KEY=VALUE, --pool-kv-extra KEY=VALUE
                           the same for one role
  --no-kv-events           engines without KV-cache events (default: each engine publishes them
                           to the proxy, which indexes what each holds exactly: its HTTP port
                           +1000, replay socket +1050, on --host; the proxy's kv_events rule)
  --prefill-args 'ARGS'    extra engine args for the prefillers (after the args after --)
  --decode-args 'ARGS'     extra engine args for the decoders
  --pool-args 'ARGS'       extra engine args for the pool engines

Running
  --python PATH            python with vLLM (default: $PDPROXY_VLLM_PYTHON or python3)
  --proxy-cmd CMD          pdproxy command (default: pdproxy on PATH, else the repo .venv's)
  --proxy-args 'ARGS'      extra arguments of `pdproxy serve` (e.g. '--config my.yaml')
  --log-dir DIR            one log file per component (default ./logs/disagg)
  --health-timeout S       seconds to wait for each engine's /health (default 600)
  --no-proxy               start only the engines
  --no-warmup              skip the warm-up request
  --dry-run                print every command with its environment; start nothing
  -h, --help               this help
EOF
}

set_defaults() {
  NUM_PREFILL="" NUM_DECODE="" CONNECTOR=nixl PREFILL_TP=1 DECODE_TP=1 DEVICE=cuda
  PREFILL_GPUS="" DECODE_GPUS="" NUM_CPUS=$(nproc 2>/dev/null || echo 1) CPU_KVCACHE_GIB=1
  NUM_POOL=0 POOL_TP=1 POOL_GPUS="" POOL_PORT=7600 POOL_CONNECTOR=nixl POOL_MODE=""
  POOL_KV_EXTRA=() POOL_ARGS_STR=""
  HOST=127.0.0.1 PROXY_PORT=9100 PREFILL_PORT=7100 DECODE_PORT=7200 SIDE_CHANNEL_PORT=5600
  LMCACHE_INIT_PORT=7300 LMCACHE_ALLOC_PORT=7400 NOTIFY_PORT=7500 UCX_TLS_VALUE=""
  PYTHON=${PDPROXY_VLLM_PYTHON:-python3} MODEL="" LOG_DIR=logs/disagg HEALTH_TIMEOUT=600
  PROXY_CMD_STR="" START_PROXY=1 WARMUP=1 DRY_RUN=0 STOP_GRACE=20 WARMUP_TIMEOUT=300
  CONFIG_DIR=$REPO_DIR/configs EXTRA_ARGS=()
  UCX_GET_ZCOPY=${UCX_CUDA_IPC_ENABLE_GET_ZCOPY:-y} BLOCK_SIZE="" PREFILL_BLOCK_SIZE=""
  DECODE_BLOCK_SIZE="" NIXL_THREADS="" CROSS_LAYER_BLOCKS="" KV_BUFFER_DEVICE="" LMCACHE_BUFFER_SIZE="" LMCACHE_ALLOC_TIMEOUT=""
  KV_EXTRA=() PREFILL_KV_EXTRA=() DECODE_KV_EXTRA=() PREFILL_ARGS_STR="" DECODE_ARGS_STR=""
  PROXY_ARGS_STR="" KV_EVENTS=1
}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

parse_args() {
  while (($#)); do
    case $1 in
      --prefill) need_value "$@"; NUM_PREFILL=$2; shift ;;
      --decode) need_value "$@"; NUM_DECODE=$2; shift ;;
      --pool) need_value "$@"; NUM_POOL=$2; shift ;;
      --pool-connector) need_value "$@"; POOL_CONNECTOR=$2; shift ;;
      --pool-mode) need_value "$@"; POOL_MODE=$2; shift ;;
      --pool-tp) need_value "$@"; POOL_TP=$2; shift ;;
      --pool-gpus) need_value "$@"; POOL_GPUS=$2; shift ;;
      --pool-port) need_value "$@"; POOL_PORT=$2; shift ;;
      --pool-kv-extra) need_value "$@"; POOL_KV_EXTRA+=("$2"); shift ;;
      --no-kv-events) KV_EVENTS=0 ;;
      --pool-args) need_value "$@"; POOL_ARGS_STR=$2; shift ;;
      --connector) need_value "$@"; CONNECTOR=$2; shift ;;
      --prefill-tp) need_value "$@"; PREFILL_TP=$2; shift ;;
      --decode-tp) need_value "$@"; DECODE_TP=$2; shift ;;
      --device) need_value "$@"; DEVICE=$2; shift ;;
      --prefill-gpus) need_value "$@"; PREFILL_GPUS=$2; shift ;;
      --decode-gpus) need_value "$@"; DECODE_GPUS=$2; shift ;;
      --cpus) need_value "$@"; NUM_CPUS=$2; shift ;;
      --cpu-kvcache-gib) need_value "$@"; CPU_KVCACHE_GIB=$2; shift ;;
      --host) need_value "$@"; HOST=$2; shift ;;
      --proxy-port) need_value "$@"; PROXY_PORT=$2; shift ;;
      --prefill-port) need_value "$@"; PREFILL_PORT=$2; shift ;;
      --decode-port) need_value "$@"; DECODE_PORT=$2; shift ;;
      --side-channel-port) need_value "$@"; SIDE_CHANNEL_PORT=$2; shift ;;
      --lmcache-init-port) need_value "$@"; LMCACHE_INIT_PORT=$2; shift ;;
      --lmcache-alloc-port) need_value "$@"; LMCACHE_ALLOC_PORT=$2; shift ;;
      --notify-port) need_value "$@"; NOTIFY_PORT=$2; shift ;;
      --ucx-tls) need_value "$@"; UCX_TLS_VALUE=$2; shift ;;
      --ucx-get-zcopy) need_value "$@"; UCX_GET_ZCOPY=$2; shift ;;
      --block-size) need_value "$@"; BLOCK_SIZE=$2; shift ;;
      --prefill-block-size) need_value "$@"; PREFILL_BLOCK_SIZE=$2; shift ;;
      --decode-block-size) need_value "$@"; DECODE_BLOCK_SIZE=$2; shift ;;
      --nixl-threads) need_value "$@"; NIXL_THREADS=$2; shift ;;
      --cross-layer-blocks) CROSS_LAYER_BLOCKS=1 ;;
      --no-cross-layer-blocks) CROSS_LAYER_BLOCKS=0 ;;
      --kv-buffer-device) need_value "$@"; KV_BUFFER_DEVICE=$2; shift ;;
      --lmcache-buffer-size) need_value "$@"; LMCACHE_BUFFER_SIZE=$(byte_count "$2") || die "--lmcache-buffer-size: '$2' is not a size (e.g. 8589934592 or 8G)"; shift ;;
      --lmcache-alloc-timeout) need_value "$@"; LMCACHE_ALLOC_TIMEOUT=$2; shift ;;
      --kv-extra) need_value "$@"; KV_EXTRA+=("$2"); shift ;;
      --prefill-kv-extra) need_value "$@"; PREFILL_KV_EXTRA+=("$2"); shift ;;
      --decode-kv-extra) need_value "$@"; DECODE_KV_EXTRA+=("$2"); shift ;;
      --prefill-args) need_value "$@"; PREFILL_ARGS_STR=$2; shift ;;
      --decode-args) need_value "$@"; DECODE_ARGS_STR=$2; shift ;;
      --model) need_value "$@"; MODEL=$2; shift ;;
      --python) need_value "$@"; PYTHON=$2; shift ;;
      --proxy-cmd) need_value "$@"; PROXY_CMD_STR=$2; shift ;;
      --proxy-args) need_value "$@"; PROXY_ARGS_STR=$2; shift ;;
      --log-dir) need_value "$@"; LOG_DIR=$2; shift ;;
      --health-timeout) need_value "$@"; HEALTH_TIMEOUT=$2; shift ;;
      --no-proxy) START_PROXY=0 ;;
      --no-warmup) WARMUP=0 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      *) die "unknown option '$1' (engine args go after --; see --help)" ;;
    esac
    shift
  done
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

validate() {
  [[ -n $MODEL ]] || die "--model is required"
  [[ $CONNECTOR == nixl || $CONNECTOR == lmcache ]] || die "--connector must be nixl or lmcache, not '$CONNECTOR'"
  [[ $DEVICE == cuda || $DEVICE == cpu ]] || die "--device must be cuda or cpu, not '$DEVICE'"
  local name dedicated=1
  is_uint "$NUM_POOL" || die "NUM_POOL must be a non-negative integer, not '$NUM_POOL'"
  ((NUM_POOL > 0)) && dedicated=0
  NUM_PREFILL=${NUM_PREFILL:-$dedicated} NUM_DECODE=${NUM_DECODE:-$dedicated}
  for name in NUM_PREFILL NUM_DECODE PREFILL_TP DECODE_TP POOL_TP NUM_CPUS PROXY_PORT PREFILL_PORT \
    DECODE_PORT POOL_PORT SIDE_CHANNEL_PORT LMCACHE_INIT_PORT LMCACHE_ALLOC_PORT NOTIFY_PORT \
    HEALTH_TIMEOUT; do
    is_uint "${!name}" || die "$name must be a non-negative integer, not '${!name}'"
  done
  ((NUM_POOL >= 1 || (NUM_PREFILL >= 1 && NUM_DECODE >= 1))) ||
    die "need at least one prefiller and one decoder, or a pool (--pool K)"
  ((PREFILL_TP >= 1 && DECODE_TP >= 1 && POOL_TP >= 1 && NUM_CPUS >= 1)) || die "TP sizes and --cpus must be >= 1"
  ((NUM_PREFILL <= 10 && NUM_DECODE <= 10 && NUM_POOL <= 10)) || die "at most 10 instances per role (side-channel port stride)"
  validate_gpus prefill "$PREFILL_GPUS" $((NUM_PREFILL * PREFILL_TP))
  validate_gpus decode "$DECODE_GPUS" $((NUM_DECODE * DECODE_TP))
  validate_gpus pool "$POOL_GPUS" $((NUM_POOL * POOL_TP))
  [[ $POOL_CONNECTOR == nixl || $POOL_CONNECTOR == none ]] || die "--pool-connector must be nixl or none, not '$POOL_CONNECTOR'"
  if [[ -z $POOL_MODE ]]; then
    if [[ $POOL_CONNECTOR == none ]]; then POOL_MODE=colocated; else POOL_MODE=adaptive; fi
  fi
  [[ $POOL_MODE == adaptive || $POOL_MODE == colocated ]] || die "--pool-mode must be adaptive or colocated, not '$POOL_MODE'"
  if ((NUM_POOL)); then
    [[ $CONNECTOR == nixl ]] || die "--pool needs --connector nixl: pool engines swap roles through the NixlConnector (kv_both)"
    [[ $POOL_MODE == colocated || $POOL_CONNECTOR == nixl ]] ||
      die "--pool-connector none moves no KV: it needs --pool-mode colocated"
    [[ $POOL_MODE == adaptive || $NUM_PREFILL == 0 ]] ||
      die "--pool-mode colocated serves every request whole: it has no use for --prefill engines"
  fi
  if [[ $DEVICE == cpu && $CONNECTOR == lmcache ]]; then
    log "warning: LMCache is a CUDA build; --device cpu with --connector lmcache will not start"
  fi
  if [[ -z $KV_BUFFER_DEVICE ]]; then
    if [[ $DEVICE == cpu ]]; then KV_BUFFER_DEVICE=cpu; else KV_BUFFER_DEVICE=cuda; fi
  fi
  [[ $KV_BUFFER_DEVICE == cuda || $KV_BUFFER_DEVICE == cpu ]] || die "--kv-buffer-device must be cuda or cpu, not '$KV_BUFFER_DEVICE'"
  if [[ -n $LMCACHE_ALLOC_TIMEOUT ]]; then
    [[ $LMCACHE_ALLOC_TIMEOUT =~ ^[0-9]+(\.[0-9]+)?$ && ! $LMCACHE_ALLOC_TIMEOUT =~ ^0+(\.0+)?$ ]] ||
      die "--lmcache-alloc-timeout: '$LMCACHE_ALLOC_TIMEOUT' is not a positive number of seconds"
  fi
  [[ $UCX_GET_ZCOPY =~ ^(y|yes|n|no|auto|try)$ ]] || die "--ucx-get-zcopy must be y, n or auto, not '$UCX_GET_ZCOPY'"
  for name in BLOCK_SIZE PREFILL_BLOCK_SIZE DECODE_BLOCK_SIZE NIXL_THREADS; do
    [[ -z ${!name} ]] || is_uint "${!name}" || die "$name must be a positive integer, not '${!name}'"
  done
  PREFILL_BLOCK_SIZE=${PREFILL_BLOCK_SIZE:-$BLOCK_SIZE} DECODE_BLOCK_SIZE=${DECODE_BLOCK_SIZE:-$BLOCK_SIZE}
  local pair
  for pair in ${KV_EXTRA[@]+"${KV_EXTRA[@]}"} ${PREFILL_KV_EXTRA[@]+"${PREFILL_KV_EXTRA[@]}"} \
    ${DECODE_KV_EXTRA[@]+"${DECODE_KV_EXTRA[@]}"} ${POOL_KV_EXTRA[@]+"${POOL_KV_EXTRA[@]}"}; do
    [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*=.+$ ]] || die "kv extra '$pair' is not KEY=VALUE"
  done
  read -r -a PREFILL_ARGS <<<"$PREFILL_ARGS_STR"
  read -r -a DECODE_ARGS <<<"$DECODE_ARGS_STR"
  read -r -a POOL_ARGS <<<"$POOL_ARGS_STR"
  read -r -a PROXY_ARGS <<<"$PROXY_ARGS_STR"
  if [[ -z $CROSS_LAYER_BLOCKS ]]; then  # default: on where vLLM can use them (CUDA attention)
    if [[ $DEVICE == cuda ]]; then CROSS_LAYER_BLOCKS=1; else CROSS_LAYER_BLOCKS=0; fi
  fi
  if ((CROSS_LAYER_BLOCKS)) && [[ $CONNECTOR == nixl && -n ${VLLM_USE_V2_MODEL_RUNNER:-} &&
    ${VLLM_USE_V2_MODEL_RUNNER,,} =~ ^(1|true|yes)$ ]]; then
    log "warning: cross-layer blocks have no effect on vLLM's V2 model runner" \
      "(VLLM_USE_V2_MODEL_RUNNER=$VLLM_USE_V2_MODEL_RUNNER: the pull still moves one descriptor per" \
      "layer and block); unset it to let the launcher pick the V1 runner, which allocates them"
  fi
  check_port_plan
  LOG_DIR=$(realpath -m "$LOG_DIR")
  if [[ -n $PROXY_CMD_STR ]]; then
    read -r -a PROXY_CMD <<<"$PROXY_CMD_STR"
  elif command -v pdproxy >/dev/null 2>&1; then
    PROXY_CMD=(pdproxy)
  else
    PROXY_CMD=("$REPO_DIR/.venv/bin/pdproxy")
  fi
}

validate_gpus() {
  local role=$1 list=$2 need=$3 ids=()
  [[ -z $list ]] && return 0
  [[ $DEVICE == cuda ]] || die "--$role-gpus needs --device cuda"
  IFS=, read -r -a ids <<<"$list"
  ((${#ids[@]} == need)) || die "--$role-gpus '$list' has ${#ids[@]} id(s); $need needed (instances x TP)"
}

# ---------------------------------------------------------------- plan, as a script

# The whole plan as shell: a summary (devices, ports, start order), one command line per
# component in start order, then the files the launcher writes before it starts anything.
print_plan() {
  local role i
  echo "# disagg plan: $NUM_PREFILL prefiller(s), $NUM_DECODE decoder(s), $NUM_POOL pool engine(s), connector $CONNECTOR, device $DEVICE"
  print_devices
  echo "# ports:"
  port_plan | while read -r port who; do printf '#   %-5s %s\n' "$port" "$who"; done
  echo "# start order: $(start_order | tr '\n' ' ')(commands below)"
  if [[ $CONNECTOR == lmcache ]]; then
    echo "# then the LMCache config files the engines read (LMCACHE_CONFIG_FILE), written first"
  fi
  echo "mkdir -p $(quote_args "$LOG_DIR")"
  local name
  while read -r name; do
    if [[ $name == proxy ]]; then print_component proxy; else print_component "${name%-*}" "${name##*-}"; fi
  done < <(start_order)
  if [[ $CONNECTOR == lmcache ]]; then
    for role in prefill decode; do
      for ((i = 0; i < $(role_count "$role"); i++)); do
        echo "cat > $(quote_args "$(lmcache_yaml_path "$role" "$i")") <<'YAML'"
        lmcache_instance_yaml "$role" "$i"
        echo "YAML"
      done
    done
  fi
}

# Component names in the order run() starts them: for LMCache the proxy first (it binds the
# notification port), for NIXL last (it reads the engines' models).
start_order() {
  local role i
  if [[ $CONNECTOR == lmcache ]] && ((START_PROXY)); then echo proxy; fi
  for role in prefill decode pool; do
    for ((i = 0; i < $(role_count "$role"); i++)); do echo "$role-$i"; done
  done
  if [[ $CONNECTOR == nixl ]] && ((START_PROXY)); then echo proxy; fi
}

# One summary line: the GPUs (or cores) each engine gets and how many in all.
print_devices() {
  local role i ids all=() each=()
  for role in prefill decode pool; do
    for ((i = 0; i < $(role_count "$role"); i++)); do
      if [[ $DEVICE == cuda ]]; then ids=$(instance_gpus "$role" "$i"); else ids=$(instance_cores "$role" "$i"); fi
      each+=("$role-$i $ids")
      IFS=',|' read -r -a ids <<<"$ids"
      all+=("${ids[@]}")
    done
  done
  local distinct
  distinct=$(printf '%s\n' "${all[@]}" | sort -nu | paste -sd, -)
  local IFS=';'
  if [[ $DEVICE == cuda ]]; then
    echo "# GPUs: $(wc -w <<<"${distinct//,/ }") needed ($distinct):${each[*]/#/ }"
  else
    echo "# CPU cores: $(wc -w <<<"${distinct//,/ }") of $NUM_CPUS ($distinct):${each[*]/#/ }"
  fi
}

print_component() {
  local name env_lines cmdline
  if [[ $1 == proxy ]]; then
    name=proxy env_lines=$(proxy_env) cmdline=$(proxy_cmd)
    ((START_PROXY)) || return 0
  else
    name="$1-$2" env_lines=$(instance_env "$1" "$2") cmdline=$(engine_cmd "$1" "$2")
  fi
  echo "# $name: log $LOG_DIR/$name.log"
  local env_args=() line
  while IFS= read -r line; do [[ -n $line ]] && env_args+=("$line"); done <<<"$env_lines"
  echo "env ${env_args[*]:+$(quote_args "${env_args[@]}") }$cmdline"
}

# ---------------------------------------------------------------- run

write_lmcache_configs() {
  local role i
  for role in prefill decode; do
    for ((i = 0; i < $(role_count "$role"); i++)); do
      lmcache_instance_yaml "$role" "$i" >"$(lmcache_yaml_path "$role" "$i")"
    done
  done
}

start_proxy() {
  ((START_PROXY)) || return 0
  start_component proxy "$(proxy_env)" "$(proxy_cmd)"
}

start_engines() {
  local role i
  for role in prefill decode pool; do
    for ((i = 0; i < $(role_count "$role"); i++)); do
      start_component "$role-$i" "$(instance_env "$role" "$i")" "$(engine_cmd "$role" "$i")"
    done
  done
}

wait_engines() {
  local role i
  for role in prefill decode pool; do
    for ((i = 0; i < $(role_count "$role"); i++)); do
      wait_healthy "$role-$i" "$(engine_url "$role" "$i")/health" "$HEALTH_TIMEOUT"
      check_alive
    done
  done
}

on_signal() {
  log "caught $1"
  trap - INT TERM
  stop_all
  exit $((128 + $2))
}

supervise() {
  log "supervising ${#STARTED_PIDS[@]} component(s); pids in $LOG_DIR/pids"
  while :; do
    check_alive
    sleep 1 &
    wait $! || true
  done
}

run() {
  check_vllm
  ((START_PROXY)) && check_proxy
  check_ports_free
  mkdir -p "$LOG_DIR"
  : >"$LOG_DIR/pids"
  trap stop_all EXIT
  trap 'on_signal SIGINT 2' INT
  trap 'on_signal SIGTERM 15' TERM
  if [[ $CONNECTOR == lmcache ]]; then
    write_lmcache_configs
    start_proxy # binds the notification port before any prefiller can notify
    ((START_PROXY)) && wait_listening proxy "$PROXY_PORT" 60
  fi
  start_engines
  wait_engines
  local model
  model=$(served_model) || die "could not read the served model name from $(first_engine_url)/v1/models"
  if [[ $CONNECTOR == nixl ]]; then
    start_proxy
    ((START_PROXY)) && wait_healthy proxy "http://$HOST:$PROXY_PORT/health" 60
  fi
  if ((START_PROXY && WARMUP)); then warm_up "$model"; fi
  ((START_PROXY)) && print_usage_hints "$model"
  supervise
}

main() {
  set_defaults
  parse_args "$@"
  validate
  if ((DRY_RUN)); then
    print_plan
    return 0
  fi
  run
}

main "$@"
