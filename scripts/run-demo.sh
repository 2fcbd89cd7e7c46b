#!/usr/bin/env bash
# Runs vigil on the default config. Starts a local mosquitto on port 1883 when no broker listens
# there (and stops it on exit).
set -euo pipefail
cd "$(dirname "$0")/.."
broker_pid=""
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  conf=$(mktemp)
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\n' > "$conf"
  mosquitto -c "$conf" >/dev/null 2>&1 &
  broker_pid=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.1; done
  echo "[demo] started mosquitto on localhost:1883 (pid $broker_pid)"
fi
cleanup() { [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null || true; }
trap cleanup EXIT
echo "[demo] watch the results in another terminal:   mosquitto_sub -v -t 'vigil/#'"
echo "[demo] only the alerts:                         mosquitto_sub -v -t 'vigil/events'"
echo "[demo] stop with Ctrl-C"
./target/release/vigil run --config config.toml &
vigil_pid=$!
trap 'kill -INT $vigil_pid 2>/dev/null || true' INT TERM
wait $vigil_pid || true
wait $vigil_pid 2>/dev/null || true
