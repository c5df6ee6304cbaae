#!/usr/bin/env bash
# Starts N jkd processes on this machine that join one jax.distributed run over localhost.
#
#   launch/local.sh N COMMAND...
#   launch/local.sh 2 jkd train --config configs/fashion_mnist/supervised.py:tiny --workdir /tmp/mp
#
# Each process gets JAX_COORDINATOR_ADDRESS=localhost:PORT, JAX_NUM_PROCESSES=N,
# JAX_PROCESS_ID=i and JKD_DISTRIBUTED=on, runs on CPU with JKD_LOCAL_DEVICES simulated devices
# (default 1; set JKD_LOCAL_PLATFORM=gpu to give each process the GPU in JAX_LOCAL_DEVICE_IDS
# instead), and prefixes its output with [pI]. The mesh spans the devices of all processes,
# exactly as on a pod. If one process fails, the others are stopped and its exit code returned.
# Use it to check a multi-host config before spending pod time.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N COMMAND... (e.g. $0 2 jkd train --config FILE.py --workdir DIR)" >&2
  exit 2
fi
num_processes=$1
shift

# A free port unless the caller chose one.
port=${JKD_LOCAL_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
devices=${JKD_LOCAL_DEVICES:-1}
platform=${JKD_LOCAL_PLATFORM:-cpu}

pids=()
cleanup() {  # SIGTERM reaches jkd itself (it saves a checkpoint and exits), then its wrapper.
  for pid in "${pids[@]}"; do
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    set -o pipefail
    export JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="$num_processes" \
      JAX_PROCESS_ID="$i" JKD_DISTRIBUTED=on PYTHONUNBUFFERED=1
    if [[ "$platform" == cpu ]]; then
      export JAX_PLATFORMS=cpu
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
    else
      export JAX_LOCAL_DEVICE_IDS="${JAX_LOCAL_DEVICE_IDS:-$i}"
    fi
    "$@" 2>&1 | sed -u "s/^/[p${i}] /"
  ) &
  pids+=($!)
done

status=0
for ((done_count = 0; done_count < num_processes; done_count++)); do
  wait -n || status=$?
  if [[ $status -ne 0 ]]; then
    echo "[local.sh] a process failed (exit $status); stopping the others" >&2
    cleanup
    wait || true
    exit "$status"
  fi
done
exit 0
