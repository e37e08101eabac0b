# Shared by deploy/local/up and deploy/local/down: process checks and stopping by pid.
# Every loop here is bounded in count and in time.

# How long a process may take to stop after SIGTERM/SIGINT before it is killed, in tenths of s.
STOP_WAIT_TENTHS=${STOP_WAIT_TENTHS:-300}

die() { echo "deploy/local: $*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

# The command line of process $1, NULs as spaces; empty when there is no such process.
cmdline_of() {
  local pid=$1
  [ -r "/proc/$pid/cmdline" ] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true
}

# Whether pid $1 is alive and its command line contains $2 (so it is still the process we
# started, not another that reused the pid).
is_ours() {
  local pid=$1 match=$2 line
  [ -n "$pid" ] && [ "$pid" -gt 1 ] 2>/dev/null || return 1
  line=$(cmdline_of "$pid")
  [ -n "$line" ] || return 1
  # A zombie has an empty cmdline and is gone for our purposes.
  case "$line" in *"$match"*) return 0 ;; *) return 1 ;; esac
}

# Stops process $2 (named $1 for messages) if it is still ours (its command line contains $3),
# with signal $4 (TERM by default), then KILL after STOP_WAIT_TENTHS. Returns non-zero when it
# could not be stopped.
stop_process() {
  local name=$1 pid=$2 match=$3 signal=${4:-TERM} i
  if ! is_ours "$pid" "$match"; then
    say "  $name (pid $pid): not running"
    return 0
  fi
  kill "-$signal" "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_WAIT_TENTHS; i++)); do
    is_ours "$pid" "$match" || { say "  $name (pid $pid): stopped"; return 0; }
    sleep 0.1
  done
  say "  $name (pid $pid): still running after SIG$signal, killing it"
  # Re-check right before the kill: only ever signal the process we started.
  if is_ours "$pid" "$match"; then kill -KILL "$pid" 2>/dev/null || true; fi
  for ((i = 0; i < 50; i++)); do
    is_ours "$pid" "$match" || { say "  $name (pid $pid): killed"; return 0; }
    sleep 0.1
  done
  say "  $name (pid $pid): could not be stopped"
  return 1
}

# The processes of a state file, one per line: name pid signal match (match last: it may hold
# spaces). The state file writes each process on a line of its own, in this exact shape:
#   {"name": "N", "pid": P, "signal": "S", "match": "M"}
state_processes() {
  sed -n 's/^ *{"name": "\([^"]*\)", "pid": \([0-9]*\), "signal": "\([A-Z]*\)", "match": "\(.*\)"},\{0,1\}$/\1 \2 \3 \4/p' "$1"
}
