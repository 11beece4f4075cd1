# shellcheck shell=bash
# Functions for launchers/disagg.sh: build, start, watch and stop a disaggregated
# prefill/decode topology of vLLM engines behind pdproxy. Sourced, not executed.

# ---------------------------------------------------------------- messages

log() { printf '[disagg] %s\n' "$*" >&2; }
die() {
  printf '[disagg] error: %s\n' "$*" >&2
  exit 1
}

# Print the arguments as one shell command line that `bash` or shlex can read back.
quote_args() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# ---------------------------------------------------------------- topology

# Roles: prefill, decode, and pool (engines that do either, NixlConnector kv_both).
role_count() {
  case $1 in prefill) echo "$NUM_PREFILL" ;; decode) echo "$NUM_DECODE" ;; *) echo "$NUM_POOL" ;; esac
}
role_tp() { case $1 in prefill) echo "$PREFILL_TP" ;; decode) echo "$DECODE_TP" ;; *) echo "$POOL_TP" ;; esac; }
http_port() {
  case $1 in
    prefill) echo $((PREFILL_PORT + $2)) ;; decode) echo $((DECODE_PORT + $2)) ;; *) echo $((POOL_PORT + $2)) ;;
  esac
}
engine_url() { echo "http://$HOST:$(http_port "$1" "$2")"; }

# KV-cache events: each engine's PUB socket connects to the proxy's, bound at its HTTP port +1000
# (an endpoint without a wildcard: vLLM connects), and it binds its replay socket at +1050; the
# proxy's kv_events rule (port_offset, replay_port_offset, bind) names the same ports.
KV_EVENTS_OFFSET=1000 KV_EVENTS_REPLAY_OFFSET=1050
kv_events_port() { echo $(($(http_port "$1" "$2") + KV_EVENTS_OFFSET)); }
kv_events_replay_port() { echo $(($(http_port "$1" "$2") + KV_EVENTS_REPLAY_OFFSET)); }
kv_events_config() {
  printf '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://%s:%s","replay_endpoint":"tcp://%s:%s"}' \
    "$HOST" "$(kv_events_port "$1" "$2")" "$HOST" "$(kv_events_replay_port "$1" "$2")"
}

# An engine that answers /v1/models: the first decoder, else the first pool engine.
first_engine_url() { if ((NUM_DECODE)); then engine_url decode 0; else engine_url pool 0; fi; }

# Whether instances of role $1 run a KV connector (pool engines may run plain: colocated).
has_kv() { [[ $1 != pool || $POOL_CONNECTOR != none ]]; }

# One NIXL side-channel listener per instance; a stride of 10 leaves room for DP ranks.
side_channel_port() {
  case $1 in
    prefill) echo $((SIDE_CHANNEL_PORT + 10 * $2)) ;;
    decode) echo $((SIDE_CHANNEL_PORT + 100 + 10 * $2)) ;;
    *) echo $((SIDE_CHANNEL_PORT + 200 + 10 * $2)) ;;
  esac
}

# LMCache receiver ports of decoder $1, one per TP rank, comma-separated.
lmcache_ports() {
  local base=$1 idx=$2 r ports=()
  for ((r = 0; r < DECODE_TP; r++)); do ports+=($((base + idx * DECODE_TP + r))); done
  local IFS=,
  echo "${ports[*]}"
}

# Position of an instance among all instances: prefillers, then decoders, then pool engines.
instance_slot() {
  case $1 in
    prefill) echo "$2" ;; decode) echo $((NUM_PREFILL + $2)) ;; *) echo $((NUM_PREFILL + NUM_DECODE + $2)) ;;
  esac
}

# The first device (or core) of instance $2 of role $1 when none are given: the roles' slices
# of the sequence 0,1,2,... in order, prefillers first.
first_device() {
  case $1 in
    prefill) echo $(($2 * PREFILL_TP)) ;;
    decode) echo $((NUM_PREFILL * PREFILL_TP + $2 * DECODE_TP)) ;;
    *) echo $((NUM_PREFILL * PREFILL_TP + NUM_DECODE * DECODE_TP + $2 * POOL_TP)) ;;
  esac
}

# Device ids (GPUs) of instance $2 of role $1: its TP-sized slice of --prefill-gpus /
# --decode-gpus / --pool-gpus, or of the sequence 0,1,2,... (prefillers first) when not given.
instance_gpus() {
  local role=$1 idx=$2 tp list ids=() i
  tp=$(role_tp "$role")
  case $role in prefill) list=$PREFILL_GPUS ;; decode) list=$DECODE_GPUS ;; *) list=$POOL_GPUS ;; esac
  if [[ -n $list ]]; then
    IFS=, read -r -a ids <<<"$list"
    ((${#ids[@]} >= (idx + 1) * tp)) || die "--$role-gpus '$list' has too few ids for $(role_count "$role") instance(s) of TP $tp"
    ids=("${ids[@]:idx*tp:tp}")
    local IFS=,
    echo "${ids[*]}"
    return
  fi
  local first
  first=$(first_device "$role" "$idx")
  for ((i = first; i < first + tp; i++)); do ids+=("$i"); done
  local IFS=,
  echo "${ids[*]}"
}

# CPU cores for instance $2 of role $1: one core per TP rank, ranks separated by '|'
# (the syntax of VLLM_CPU_OMP_THREADS_BIND); wraps around when cores run out.
instance_cores() {
  local role=$1 idx=$2 tp slot first r ranks=()
  tp=$(role_tp "$role")
  first=$(first_device "$role" "$idx")
  for ((r = 0; r < tp; r++)); do ranks+=($(((first + r) % NUM_CPUS))); done
  local IFS='|'
  echo "${ranks[*]}"
}

# ---------------------------------------------------------------- per-instance config

# VALUE as JSON: numbers, true, false and null as they are, anything else as a string.
json_value() {
  local v=$1
  if [[ $v =~ ^-?[0-9]+(\.[0-9]+)?$ || $v == true || $v == false || $v == null ]]; then
    printf '%s' "$v"
  else
    v=${v//\\/\\\\}
    printf '"%s"' "${v//\"/\\\"}"
  fi
}

# KEY=VALUE lines of kv_connector_extra_config for role $1, instance $2: the connector's own
# keys, then --nixl-threads / --cross-layer-blocks, then --kv-extra, then the role's own
# --*-kv-extra; a later line for the same key wins.
kv_extra_pairs() {
  local role=$1 idx=$2
  if [[ $CONNECTOR == lmcache ]]; then
    echo "discard_partial_chunks=false"
    if [[ $role == prefill ]]; then
      echo "lmcache_rpc_port=producer$((idx + 1))"
    else
      echo "lmcache_rpc_port=consumer$((idx + 1))"
      # Look the WHOLE prompt up: the proxy sends the decoder the client's own N-token request,
      # the prefiller pushed chunks of exactly those N tokens, and the receive buffer frees a
      # chunk only when the decoder retrieves it. Skipping the last token (LMCache's example
      # value, for its proxy that appends the first token) misses the last chunk's hash, so
      # that chunk would stay in the buffer for good: one chunk per request until pushes block.
      echo "skip_last_n_tokens=0"
    fi
  else
    if [[ -n $NIXL_THREADS ]]; then echo "num_threads=$NIXL_THREADS"; fi
    if ((CROSS_LAYER_BLOCKS)); then echo "enable_cross_layers_blocks=true"; fi
  fi
  local pair
  for pair in ${KV_EXTRA[@]+"${KV_EXTRA[@]}"}; do echo "$pair"; done
  case $role in
    prefill) for pair in ${PREFILL_KV_EXTRA[@]+"${PREFILL_KV_EXTRA[@]}"}; do echo "$pair"; done ;;
    decode) for pair in ${DECODE_KV_EXTRA[@]+"${DECODE_KV_EXTRA[@]}"}; do echo "$pair"; done ;;
    *) for pair in ${POOL_KV_EXTRA[@]+"${POOL_KV_EXTRA[@]}"}; do echo "$pair"; done ;;
  esac
}

# The pairs above as a JSON object body (no braces), each key once, in first-seen order.
kv_extra_json() {
  local keys=() line key i out=()
  declare -A value=()
  while IFS= read -r line; do
    [[ -n $line ]] || continue
    key=${line%%=*}
    [[ -v "value[$key]" ]] || keys+=("$key")
    value[$key]=${line#*=}
  done < <(kv_extra_pairs "$1" "$2")
  for i in "${!keys[@]}"; do
    out+=("$(printf '"%s":%s' "${keys[i]}" "$(json_value "${value[${keys[i]}]}")")")
  done
  local IFS=,
  printf '%s' "${out[*]}"
}

kv_transfer_config() {
  local role=$1 idx=$2 kv_role extra
  case $role in prefill) kv_role=kv_producer ;; decode) kv_role=kv_consumer ;; *) kv_role=kv_both ;; esac
  extra=$(kv_extra_json "$role" "$idx")
  if [[ $CONNECTOR == nixl ]]; then
    printf '{"kv_connector":"NixlConnector","kv_role":"%s","kv_buffer_device":"%s"' \
      "$kv_role" "$KV_BUFFER_DEVICE"
  else
    printf '{"kv_connector":"LMCacheConnectorV1","kv_role":"%s"' "$kv_role"
  fi
  if [[ -n $extra ]]; then printf ',"kv_connector_extra_config":{%s}' "$extra"; fi
  printf '}'
}

lmcache_yaml_path() { echo "$LOG_DIR/lmcache-$1-$2.yaml"; }

# Bytes of a size given as digits with an optional K, M or G (powers of 1024) suffix.
byte_count() {
  local n=${1%[KkMmGg]} unit=${1: -1} mult=1
  [[ $n =~ ^[0-9]+$ ]] || return 1
  case $unit in [Kk]) mult=1024 ;; [Mm]) mult=1048576 ;; [Gg]) mult=1073741824 ;; esac
  ((n * mult > 0)) || return 1
  echo $((n * mult))
}

# The instance's LMCache YAML: the commented template from configs/ with the keys that
# differ per instance rewritten.
lmcache_yaml() {
  local role=$1 idx=$2 template
  if [[ $role == prefill ]]; then template=$CONFIG_DIR/lmcache-prefiller.yaml; else template=$CONFIG_DIR/lmcache-decoder.yaml; fi
  [[ -r $template ]] || die "LMCache template $template is missing"
  local buffer="s|^pd_buffer_size:.*|&|"  # the receive buffer: decoders' only
  if [[ $role != prefill && -n $LMCACHE_BUFFER_SIZE ]]; then
    buffer="s|^pd_buffer_size:.*|pd_buffer_size: $LMCACHE_BUFFER_SIZE|"
  fi
  sed -E \
    -e "s|^pd_buffer_device:.*|pd_buffer_device: \"$KV_BUFFER_DEVICE\"|" \
    -e "s|^pd_proxy_host:.*|pd_proxy_host: \"$HOST\"|" \
    -e "s|^pd_proxy_port:.*|pd_proxy_port: $NOTIFY_PORT|" \
    -e "s|^pd_peer_host:.*|pd_peer_host: \"$HOST\"|" \
    -e "s|^pd_peer_init_port:.*|pd_peer_init_port: [$(lmcache_ports "$LMCACHE_INIT_PORT" "$idx")]|" \
    -e "s|^pd_peer_alloc_port:.*|pd_peer_alloc_port: [$(lmcache_ports "$LMCACHE_ALLOC_PORT" "$idx")]|" \
    -e "$buffer" "$template"
  if [[ $role != prefill && -n $LMCACHE_ALLOC_TIMEOUT ]]; then
    printf '\n# --lmcache-alloc-timeout: a push that finds no room waits at most this long\n'
    echo "pd_allocation_timeout_sec: $LMCACHE_ALLOC_TIMEOUT"
  fi
}

# The YAML of instance $2 of role $1 as written: lmcache_yaml, under a first line that names
# the instance, and with the template's example lmcache_rpc_port and config path replaced by
# this instance's own (every copy said producer1 or consumer1).
lmcache_instance_yaml() {
  local role=$1 idx=$2 template rpc path
  if [[ $role == prefill ]]; then template=lmcache-prefiller.yaml; else template=lmcache-decoder.yaml; fi
  rpc=$(kv_extra_pairs "$role" "$idx" | sed -n 's/^lmcache_rpc_port=//p' | tail -n 1)
  path=$(lmcache_yaml_path "$role" "$idx")
  echo "# $role-$idx: written by launchers/disagg.sh from configs/$template"
  lmcache_yaml "$role" "$idx" | sed -E \
    -e "/^#/s@\"lmcache_rpc_port\":\"(producer|consumer)1\"@\"lmcache_rpc_port\":\"$rpc\"@" \
    -e "/^#/s|LMCACHE_CONFIG_FILE=\.\.\.|LMCACHE_CONFIG_FILE=$path|"
}

# KEY=VALUE lines of the environment the launcher sets for one engine instance.
instance_env() {
  local role=$1 idx=$2
  echo "PYTHONHASHSEED=0"
  if [[ $DEVICE == cuda ]]; then
    echo "CUDA_VISIBLE_DEVICES=$(instance_gpus "$role" "$idx")"
  else
    echo "VLLM_CPU_OMP_THREADS_BIND=$(instance_cores "$role" "$idx")"
    echo "VLLM_CPU_KVCACHE_SPACE=$CPU_KVCACHE_GIB"
  fi
  if ! has_kv "$role"; then
    : # a plain engine: no side channel
  elif [[ $CONNECTOR == nixl ]]; then
    echo "VLLM_NIXL_SIDE_CHANNEL_HOST=$HOST"
    echo "VLLM_NIXL_SIDE_CHANNEL_PORT=$(side_channel_port "$role" "$idx")"
  else
    echo "LMCACHE_CONFIG_FILE=$(lmcache_yaml_path "$role" "$idx")"
  fi
  if [[ -n $UCX_TLS_VALUE ]]; then echo "UCX_TLS=$UCX_TLS_VALUE"; fi
  # NIXL moves the KV through UCX; without this, UCX allows cuda_ipc reads (the decoder's
  # pull) only where NVML reports NVLink, and pulls go through TCP (README "KV transfer").
  if [[ $DEVICE == cuda ]]; then echo "UCX_CUDA_IPC_ENABLE_GET_ZCOPY=$UCX_GET_ZCOPY"; fi
  # Cross-layer KV blocks exist only on vLLM's V1 model runner (0.24 runs Llama on V2, whose
  # connector glue does not register them); the user's own VLLM_USE_V2_MODEL_RUNNER wins.
  if has_kv "$role" && [[ $CONNECTOR == nixl ]] && ((CROSS_LAYER_BLOCKS)) &&
    [[ -z ${VLLM_USE_V2_MODEL_RUNNER+set} ]]; then
    echo "VLLM_USE_V2_MODEL_RUNNER=0"
  fi
}

# KEY=VALUE lines of the proxy's environment: what it should know of the engines' (the UCX
# setting, which its slow-KV warning would otherwise recommend even where it is set).
proxy_env() {
  if [[ $DEVICE == cuda ]]; then echo "PDPROXY_ENGINE_UCX_CUDA_IPC_ENABLE_GET_ZCOPY=$UCX_GET_ZCOPY"; fi
}

engine_cmd() {
  local role=$1 idx=$2
  local cmd=("$PYTHON" -m vllm.entrypoints.openai.api_server
    --model "$MODEL" --host "$HOST" --port "$(http_port "$role" "$idx")"
    --tensor-parallel-size "$(role_tp "$role")")
  if has_kv "$role"; then cmd+=(--kv-transfer-config "$(kv_transfer_config "$role" "$idx")"); fi
  if [[ $DEVICE == cpu ]]; then cmd+=(--dtype float32 --enforce-eager); fi
  if ((KV_EVENTS)); then cmd+=(--kv-events-config "$(kv_events_config "$role" "$idx")"); fi
  local block=$DECODE_BLOCK_SIZE role_args=(${DECODE_ARGS[@]+"${DECODE_ARGS[@]}"})
  if [[ $role == prefill ]]; then
    block=$PREFILL_BLOCK_SIZE role_args=(${PREFILL_ARGS[@]+"${PREFILL_ARGS[@]}"})
  elif [[ $role == pool ]]; then
    block=$BLOCK_SIZE role_args=(${POOL_ARGS[@]+"${POOL_ARGS[@]}"})
  fi
  if [[ -n $block ]]; then cmd+=(--block-size "$block"); fi
  # An LMCache receiver frees a pushed chunk only when it loads it; chunks that vLLM's own
  # prefix cache already covers are not loaded, so they would never be freed. Later engine
  # args may turn it back on.
  if [[ $CONNECTOR == lmcache && $role == decode ]]; then cmd+=(--no-enable-prefix-caching); fi
  cmd+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} ${role_args[@]+"${role_args[@]}"})
  quote_args "${cmd[@]}"
}

proxy_cmd() {
  local cmd=("${PROXY_CMD[@]}" serve) i
  for ((i = 0; i < NUM_PREFILL; i++)); do cmd+=(--prefill "$(engine_url prefill "$i")"); done
  for ((i = 0; i < NUM_DECODE; i++)); do cmd+=(--decode "$(engine_url decode "$i")"); done
  for ((i = 0; i < NUM_POOL; i++)); do cmd+=(--pool "$(engine_url pool "$i")"); done
  if ((NUM_POOL)); then cmd+=(--pool-mode "$POOL_MODE"); fi
  cmd+=(--host "$HOST" --port "$PROXY_PORT" --connector "$CONNECTOR")
  if ((KV_EVENTS)); then cmd+=(--kv-events); fi
  cmd+=(${PROXY_ARGS[@]+"${PROXY_ARGS[@]}"})
  quote_args "${cmd[@]}"
}

# Every TCP port the topology will listen on, one per line: the port, a space, and who
# listens there (the instance and the option that sets the base port).
port_plan() {
  local role i name r ports
  echo "$PROXY_PORT the proxy (--proxy-port)"
  for role in prefill decode pool; do
    for ((i = 0; i < $(role_count "$role"); i++)); do
      name="$role-$i"
      echo "$(http_port "$role" "$i") $name's HTTP server (--$role-port)"
      if ((KV_EVENTS)); then
        echo "$(kv_events_port "$role" "$i") the proxy's KV-event socket for $name (--$role-port +$KV_EVENTS_OFFSET)"
        echo "$(kv_events_replay_port "$role" "$i") $name's KV-event replay socket (--$role-port +$KV_EVENTS_REPLAY_OFFSET)"
      fi
      if [[ $CONNECTOR == nixl ]] && has_kv "$role"; then
        echo "$(side_channel_port "$role" "$i") $name's NIXL side channel (--side-channel-port)"
      fi
      if [[ $CONNECTOR == lmcache && $role == decode ]]; then
        IFS=, read -r -a ports <<<"$(lmcache_ports "$LMCACHE_INIT_PORT" "$i")"
        for r in "${!ports[@]}"; do echo "${ports[r]} $name's LMCache init port, TP rank $r (--lmcache-init-port)"; done
        IFS=, read -r -a ports <<<"$(lmcache_ports "$LMCACHE_ALLOC_PORT" "$i")"
        for r in "${!ports[@]}"; do echo "${ports[r]} $name's LMCache alloc port, TP rank $r (--lmcache-alloc-port)"; done
      fi
    done
  done
  if [[ $CONNECTOR == lmcache ]]; then echo "$NOTIFY_PORT the proxy's LMCache notifications (--notify-port)"; fi
}

all_ports() { port_plan | cut -d' ' -f1; }

# Refuse a plan that gives one port to two listeners, naming both.
check_port_plan() {
  local port who
  declare -A user=()
  while read -r port who; do
    [[ -v "user[$port]" ]] && die "port $port is planned for both ${user[$port]} and $who; move one of them"
    user[$port]=$who
  done < <(port_plan)
}

# ---------------------------------------------------------------- processes

STARTED_NAMES=()
STARTED_PIDS=()

# Start a command in its own session (PID == process group id) with extra
# environment, logging stdout and stderr to $LOG_DIR/NAME.log.
start_component() {
  local name=$1 env_lines=$2 cmdline=$3 env_args=() line
  while IFS= read -r line; do [[ -n $line ]] && env_args+=("$line"); done <<<"$env_lines"
  local logfile="$LOG_DIR/$name.log"
  log "starting $name (log: $logfile)"
  # The background subshell execs setsid, which (not being a group leader) execs the
  # command in a new session: $! is then the component's PID and its process group id.
  # cmdline was built by quote_args; eval re-splits it.
  eval "exec setsid env $(quote_args "${env_args[@]}") $cmdline" >"$logfile" 2>&1 </dev/null &
  STARTED_NAMES+=("$name")
  STARTED_PIDS+=("$!")
  printf '%s %s\n' "$name" "$!" >>"$LOG_DIR/pids"
}

pid_of() {
  local i
  for i in "${!STARTED_NAMES[@]}"; do
    [[ ${STARTED_NAMES[i]} == "$1" ]] && echo "${STARTED_PIDS[i]}" && return
  done
}

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

show_log_tail() {
  local logfile="$LOG_DIR/$1.log"
  printf '[disagg] ---- last 40 lines of %s ----\n' "$logfile" >&2
  tail -n 40 "$logfile" >&2 || true
  printf '[disagg] ----\n' >&2
}

# Stop every process group we started, newest first: TERM, then KILL after a grace period.
stop_all() {
  local i pid deadline
  ((${#STARTED_PIDS[@]})) || return 0
  log "stopping ${#STARTED_PIDS[@]} component(s)"
  for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM -- "-${STARTED_PIDS[i]}" 2>/dev/null || true
  done
  deadline=$((SECONDS + STOP_GRACE))
  for pid in "${STARTED_PIDS[@]}"; do
    while group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if group_alive "$pid"; then
      log "process group $pid did not stop in ${STOP_GRACE}s; killing it"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  STARTED_PIDS=()
  STARTED_NAMES=()
}

# ---------------------------------------------------------------- checks

port_in_use() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

check_ports_free() {
  local port taken=()
  while read -r port; do port_in_use "$port" && taken+=("$port"); done < <(all_ports)
  ((${#taken[@]} == 0)) || die "port(s) already in use on $HOST: ${taken[*]} (stop what holds them or pick other base ports)"
}

check_vllm() {
  command -v "$PYTHON" >/dev/null 2>&1 || die "python '$PYTHON' not found (pass --python PATH to a python with vllm)"
  "$PYTHON" -c 'import vllm' >/dev/null 2>&1 ||
    die "vLLM is not importable with '$PYTHON' (pass --python PATH, or run .ci/setup-vllm.sh)"
  if [[ $CONNECTOR == lmcache ]]; then
    "$PYTHON" -c 'import lmcache' >/dev/null 2>&1 || die "LMCache is not importable with '$PYTHON'"
  fi
}

check_proxy() {
  command -v "${PROXY_CMD[0]}" >/dev/null 2>&1 || die "pdproxy command '${PROXY_CMD[0]}' not found (pass --proxy-cmd)"
}

# Wait until URL answers 200 while the process group of NAME lives; print progress.
wait_healthy() {
  local name=$1 url=$2 timeout=$3 pid start code
  pid=$(pid_of "$name")
  start=$SECONDS
  while :; do
    code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$url" 2>/dev/null) || code=000
    [[ $code == 200 ]] && break
    if ! kill -0 "$pid" 2>/dev/null; then
      show_log_tail "$name"
      die "$name exited during start-up (log: $LOG_DIR/$name.log)"
    fi
    if ((SECONDS - start >= timeout)); then
      show_log_tail "$name"
      die "$name not healthy at $url after ${timeout}s"
    fi
    if (((SECONDS - start) % 10 == 0)); then log "waiting for $name at $url ... $((SECONDS - start))s"; fi
    sleep 1
  done
  log "$name is healthy after $((SECONDS - start))s"
}

# Wait until something accepts connections on PORT while NAME lives.
wait_listening() {
  local name=$1 port=$2 timeout=$3 start=$SECONDS
  until port_in_use "$port"; do
    check_alive
    ((SECONDS - start < timeout)) || die "$name is not listening on $HOST:$port after ${timeout}s"
    sleep 0.5
  done
}

# Fail if any started component has exited.
check_alive() {
  local i
  for i in "${!STARTED_PIDS[@]}"; do
    if ! kill -0 "${STARTED_PIDS[i]}" 2>/dev/null; then
      show_log_tail "${STARTED_NAMES[i]}"
      die "${STARTED_NAMES[i]} exited (log: $LOG_DIR/${STARTED_NAMES[i]}.log)"
    fi
  done
}

served_model() {
  curl -s -m 10 "$(first_engine_url)/v1/models" |
    "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])'
}

warm_up() {
  local model=$1 body code
  body=$(printf '{"model":"%s","prompt":"Hello, warm-up","max_tokens":4,"temperature":0}' "$model")
  log "warm-up request through the proxy"
  code=$(curl -s -o "$LOG_DIR/warmup.json" -m "$WARMUP_TIMEOUT" -w '%{http_code}' \
    -H 'Content-Type: application/json' -d "$body" "http://$HOST:$PROXY_PORT/v1/completions") || code=000
  [[ $code == 200 ]] || {
    cat "$LOG_DIR/warmup.json" >&2 2>/dev/null || true
    die "warm-up request through the proxy failed (HTTP $code); see $LOG_DIR/proxy.log"
  }
}

print_usage_hints() {
  local model=$1 url="http://$HOST:$PROXY_PORT"
  cat <<EOF
[disagg] ready: proxy at $url ($NUM_PREFILL prefiller(s), $NUM_DECODE decoder(s), $NUM_POOL pool engine(s), connector $CONNECTOR); logs in $LOG_DIR
[disagg] try:
  curl -s $url/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model":"$model","prompt":"San Francisco is a","max_tokens":32,"temperature":0}'
  curl -s $url/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"$model","messages":[{"role":"user","content":"Hello!"}],"max_tokens":32}'
[disagg] benchmark:
  $PYTHON $LAUNCHER_DIR/bench_serve.py --backend vllm --base-url $url --model $model \\
    --tokenizer $MODEL --dataset-name random --random-input-len 128 --random-output-len 32 \\
    --num-prompts 20
[disagg] Ctrl+C stops everything.
EOF
}
