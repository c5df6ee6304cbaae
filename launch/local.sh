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

# Each process runs in its own session (setsid), so a Ctrl-C in this terminal reaches this script
# only and each process gets exactly one SIGTERM from it: jkd treats a second signal as "stop at
# once", which would cut its last checkpoint short.
detach=()
if command -v setsid >/dev/null; then detach=(setsid); fi

pids=()
stopping=0
signal_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
on_signal() {
  if (( stopping )); then
    echo "[local.sh] signalled again: stopping every process at once" >&2
  else
    echo "[local.sh] stopping: each process saves a checkpoint and exits (signal again to stop at once)" >&2
  fi
  stopping=$((stopping + 1))
  signal_all
}
trap on_signal INT TERM

for ((i = 0; i < num_processes; i++)); do
  vars=(JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="$num_processes"
        JAX_PROCESS_ID="$i" JKD_DISTRIBUTED=on PYTHONUNBUFFERED=1)
  if [[ "$platform" == cpu ]]; then
    vars+=(JAX_PLATFORMS=cpu
           XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}")
  else
    vars+=(JAX_LOCAL_DEVICE_IDS="${JAX_LOCAL_DEVICE_IDS:-$i}")
  fi
  # $! is the process itself (setsid and env exec it), not a wrapper. The prefixing sed ignores
  # INT/TERM so it outlives the process and prints its last lines (the checkpoint it saved).
  "${detach[@]}" env "${vars[@]}" "$@" > >(trap '' INT TERM; exec sed -u "s/^/[p${i}] /") 2>&1 &
  pids+=($!)
done

# Reap the processes as they finish. A process stopped by a signal (130, 143) has saved a
# checkpoint, and the others stop at the same step by themselves (jkd agrees on the stop step
# across processes): they are left alone. Any other failure would leave the others blocked in
# a collective, so they are stopped.
status=0
declare -A finished=()
while (( ${#finished[@]} < num_processes )); do
  running=()
  for index in "${!pids[@]}"; do
    [[ -n "${finished[$index]:-}" ]] || running+=("${pids[$index]}")
  done
  rc=0
  wait -n "${running[@]}" || rc=$?
  for index in "${!pids[@]}"; do
    pid=${pids[$index]}
    if [[ -z "${finished[$index]:-}" ]] && ! kill -0 "$pid" 2>/dev/null; then
      finished[$index]=$rc
      if (( rc != 0 && status == 0 )); then status=$rc; fi
      if (( rc != 0 && rc != 130 && rc != 143 && stopping == 0 )); then
        echo "[local.sh] process $index failed (exit $rc); stopping the others" >&2
        stopping=1
        signal_all
      fi
      break  # wait -n reaped one process; a second one that ended meanwhile comes next round.
    fi
  done
done
wait  # The output prefixers.
exit "$status"
