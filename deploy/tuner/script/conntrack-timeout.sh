#!/bin/sh
# The race lab's conntrack timeout tuner and reset, for one node (POSIX sh: busybox and dash).
#
# The race needs kernel conntrack entries that expire while the agent's cache still holds their
# keys, so the lab shortens the node's nf_conntrack_tcp_timeout_established for a while and
# then puts the node's own value back: the value the node had, never a guessed constant.
#
#   tune     record the node's original value (once: a restarted tuner keeps the first record),
#            set TEST_TIMEOUT, hold it until SIGTERM/SIGINT or until TTL seconds have passed,
#            then restore the recorded original and remove the record. While holding, it reads
#            the live value every CHECK_INTERVAL seconds and sets TEST_TIMEOUT again when
#            something else changed it (kube-proxy writes its own value when it restarts),
#            logging the value it found and the one it set.
#   ready    the tuner's readiness probe: succeeds only while the node is tuned and the live
#            value is TEST_TIMEOUT.
#   restore  restore the recorded original now and remove the record (the tuner's preStop
#            hook); without a record there is nothing to restore.
#   reset    the safety net after the lab: restore the recorded original if a record is left
#            (a tuner that was killed without restoring); otherwise, if the value is still the
#            test value, set RESET_FALLBACK; otherwise leave the node alone. With HOLD=1 it then
#            stays up (a DaemonSet pod that is Ready once its node is reset).
#
# Settings (environment): SYSCTL_DIR (/proc/sys/net/netfilter of the node), STATE_DIR (where
# the record lives, a hostPath so it outlives the pod), TEST_TIMEOUT (30), TTL (3600),
# CHECK_INTERVAL (5),
# RESET_FALLBACK (86400: kube-proxy's default; the kernel's own is 432000), READY_FILE (created
# while the node is tuned or once it is reset: the readiness probe), POD_UID, NODE_NAME, HOLD.
set -u

KEY=nf_conntrack_tcp_timeout_established
SYSCTL_DIR=${SYSCTL_DIR:-/proc/sys/net/netfilter}
STATE_DIR=${STATE_DIR:-/var/lib/detector-lab}
TEST_TIMEOUT=${TEST_TIMEOUT:-30}
TTL=${TTL:-3600}
CHECK_INTERVAL=${CHECK_INTERVAL:-5}
RESET_FALLBACK=${RESET_FALLBACK:-86400}
READY_FILE=${READY_FILE:-/run/lab/ready}
NODE=${NODE_NAME:-$(hostname)}
FILE=$SYSCTL_DIR/$KEY
RECORD=$STATE_DIR/$KEY.orig
sleeper=

log() { printf '%s %s conntrack-timeout: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$NODE" "$*"; }
die() { log "error: $*" >&2; exit 1; }

# A positive whole number of seconds, or a clear error naming the setting.
check_secs() {
  case $2 in
    '' | *[!0-9]* | 0) die "$1=$2 is not a positive whole number of seconds: set $1 to e.g. 30" ;;
  esac
}

read_value() {
  v=$(cat "$FILE" 2>/dev/null) \
    || die "cannot read $FILE: is nf_conntrack loaded (modprobe nf_conntrack) and the node's $SYSCTL_DIR mounted?"
  case $v in '' | *[!0-9]*) die "$FILE holds '$v', not a number of seconds" ;; esac
  printf '%s' "$v"
}

write_value() {
  err=$({ printf '%s\n' "$1" >"$FILE"; } 2>&1) \
    || die "cannot write $1 to $FILE ($err): the container needs root and a writable mount of the node's $SYSCTL_DIR"
  now=$(read_value) || exit 1
  [ "$now" = "$1" ] || die "wrote $1 to $FILE but it reads back $now"
}

# The recorded original (call only when "$RECORD" exists; a bad record is an error, never
# mistaken for no record).
recorded() {
  r=$(cat "$RECORD") || die "cannot read the record $RECORD"
  case $r in '' | *[!0-9]*) die "the record $RECORD holds '$r', not a number of seconds: fix or remove it" ;; esac
  printf '%s' "$r"
}

# Restores the recorded original and removes the record; says what it did either way.
restore() {
  why=$1
  cur=$(read_value) || exit 1
  if [ -f "$RECORD" ]; then
    orig=$(recorded) || exit 1
    write_value "$orig"
    rm -f "$RECORD"
    log "$why: restored $KEY from $cur s to the original $orig s"
  else
    log "$why: no record in $STATE_DIR, nothing to restore ($KEY is $cur s)"
  fi
}

# Stays up doing nothing until SIGTERM/SIGINT (a DaemonSet pod must not exit).
idle() {
  trap 'exit 0' TERM INT
  while :; do
    sleep 3600 &
    wait $! || true
  done
}

# Holds TEST_TIMEOUT until TTL seconds have passed: every CHECK_INTERVAL seconds, reads the
# live value and writes TEST_TIMEOUT again if it changed. Returns at the TTL; a signal's handler
# exits instead.
hold() {
  deadline=$(($(date +%s) + TTL))
  while :; do
    left=$((deadline - $(date +%s)))
    [ "$left" -gt 0 ] || return 0
    step=$CHECK_INTERVAL
    [ "$left" -lt "$step" ] && step=$left
    sleep "$step" &
    sleeper=$!
    wait "$sleeper"
    sleeper=
    live=$(read_value) || exit 1
    if [ "$live" != "$TEST_TIMEOUT" ]; then
      rm -f "$READY_FILE"
      write_value "$TEST_TIMEOUT"
      : >"$READY_FILE"
      log "drift: $KEY was changed behind the tuner's back (kube-proxy restarted?): set $live s -> $TEST_TIMEOUT s"
    fi
  done
}

# The readiness probe: tuned (the ready file) and the live value is the test value.
ready() {
  [ -f "$READY_FILE" ] || { echo "not tuned: no $READY_FILE"; exit 1; }
  live=$(read_value) || exit 1
  [ "$live" = "$TEST_TIMEOUT" ] \
    || { echo "$KEY is $live s, not the test value $TEST_TIMEOUT s (set again within $CHECK_INTERVAL s)"; exit 1; }
  echo "tuned: $KEY is $live s"
}

tune() {
  check_secs TEST_TIMEOUT "$TEST_TIMEOUT"
  check_secs TTL "$TTL"
  check_secs CHECK_INTERVAL "$CHECK_INTERVAL"
  mkdir -p "$STATE_DIR" || die "cannot create $STATE_DIR"
  rm -f "$READY_FILE"
  if [ -n "${POD_UID:-}" ] && [ -f "$STATE_DIR/ttl-expired.$POD_UID" ]; then
    # This pod's TTL already ran out and the node was restored: a container restart must
    # not shorten the timeout again.
    log "the TTL of this tuner pod ($POD_UID) already expired: not tuning again"
    idle
  fi
  cur=$(read_value) || exit 1
  if [ -f "$RECORD" ]; then
    orig=$(recorded) || exit 1
    log "original $KEY: $orig s (recorded earlier on this node by a tuner that did not restore; now $cur s)"
  else
    orig=$cur
    printf '%s\n' "$orig" >"$RECORD.tmp" && mv "$RECORD.tmp" "$RECORD" \
      || die "cannot write the record $RECORD"
    log "original $KEY: $orig s (recorded in $RECORD)"
  fi
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
  write_value "$TEST_TIMEOUT"
  mkdir -p "$(dirname "$READY_FILE")" && : >"$READY_FILE"
  log "set $KEY: $cur s -> $TEST_TIMEOUT s (restored on termination or after the TTL of $TTL s; checked every $CHECK_INTERVAL s)"
  hold
  # Only the TTL ends the hold (a signal's handler exits).
  rm -f "$READY_FILE"
  # Marked first: a container restart from here on must not tune again.
  if [ -n "${POD_UID:-}" ]; then : >"$STATE_DIR/ttl-expired.$POD_UID"; fi
  restore "TTL of $TTL s reached"
  idle
}

on_signal() {
  [ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null
  rm -f "$READY_FILE"
  restore "SIG$1"
  exit 0
}

reset() {
  check_secs RESET_FALLBACK "$RESET_FALLBACK"
  check_secs TEST_TIMEOUT "$TEST_TIMEOUT"
  rm -f "$READY_FILE"
  cur=$(read_value) || exit 1
  if [ -f "$RECORD" ]; then
    restore "reset"
  elif [ "$cur" = "$TEST_TIMEOUT" ]; then
    write_value "$RESET_FALLBACK"
    log "reset: no record in $STATE_DIR and $KEY is still the test value $cur s: set the fallback $RESET_FALLBACK s"
  else
    log "reset: no record in $STATE_DIR and $KEY is $cur s, not the test value $TEST_TIMEOUT s: left unchanged"
  fi
  mkdir -p "$(dirname "$READY_FILE")" && : >"$READY_FILE"
  now=$(read_value) || exit 1
  log "reset done: $KEY is $now s"
  if [ "${HOLD:-0}" = 1 ]; then idle; fi
}

case ${1:-} in
  tune) tune ;;
  restore) restore "restore" ;;
  reset) reset ;;
  ready) ready ;;
  *) die "usage: $0 tune|restore|reset|ready (got '${1:-}')" ;;
esac
