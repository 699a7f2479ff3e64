# Shared helpers of the token stack scripts (sourced, not run).
#
# Every stack keeps all of its state under one directory given by the caller, and writes there:
#   env        `export NAME='value'` lines, one per line: the module (RUSTLS_HSM_MODULE) and the
#              variables a client process needs to reach the token;
#   label      the token label;
#   user.pin, so.pin   the PINs, mode 0600;
#   *.pid      the pids of the processes the stack started, for its stop script.

# Say which command failed: the tools these scripts drive often fail without a word.
set -E
trap 'status=$?; echo "${0##*/}: line $LINENO: \`$BASH_COMMAND\` failed (exit status $status)" >&2' ERR

STACKS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOKEN_LABEL="${STACK_TOKEN_LABEL:-rustls-hsm-test}"

# stack_dir DIR: creates DIR (0700) and prints its absolute path
stack_dir() {
  mkdir -p "$1"
  chmod 700 "$1"
  (cd "$1" && pwd)
}

# random_pin: 8 random digits
random_pin() {
  od -An -N8 -tu1 /dev/urandom | tr -s ' ' '\n' | grep . | while read -r b; do
    printf '%d' $((b % 10))
  done
}

# make_pins DIR: writes user.pin, so.pin and label unless they exist
make_pins() {
  local dir=$1
  if [ ! -f "$dir/user.pin" ]; then
    (umask 077 && random_pin > "$dir/user.pin" && random_pin > "$dir/so.pin")
  fi
  [ -f "$dir/label" ] || printf '%s' "$TOKEN_LABEL" > "$dir/label"
}

# env_line NAME VALUE: one line of the env file
env_line() {
  printf "export %s='%s'\n" "$1" "$2"
}

# wait_for SECONDS COMMAND...: retries COMMAND every 50 ms until it succeeds or time runs out
wait_for() {
  local tries=$(($1 * 20))
  shift
  local i
  for ((i = 0; i < tries; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  "$@"
}

# is_alive PID: the process exists and is not a zombie (daemons re-parented to an init that
# does not reap stay zombies)
is_alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# is_running PIDFILE: the process named in PIDFILE is alive
is_running() {
  [ -f "$1" ] && is_alive "$(cat "$1")"
}

# kill_pidfile PIDFILE: kills that process (SIGKILL: the stacks simulate crashes, and nothing
# of theirs needs a clean shutdown) and removes its pid file
kill_pidfile() {
  local file=$1 pid i
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  kill -9 "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    is_alive "$pid" || break
    sleep 0.02
  done
  rm -f "$file"
}

# free_port_pair: prints a port P such that P and P+1 seem free on 127.0.0.1, below the
# ephemeral range (a port there can be taken by any outgoing connection at any time)
free_port_pair() {
  local low p i
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  for ((i = 0; i < 50; i++)); do
    p=$((10000 + RANDOM % (low - 10002)))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null \
      && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "no free port pair found" >&2
  return 1
}

# softhsm_module: Debian's SoftHSM module
softhsm_module() {
  local m
  for m in "${SOFTHSM2_MODULE:-}" /usr/lib/softhsm/libsofthsm2.so \
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so; do
    [ -n "$m" ] && [ -e "$m" ] && { echo "$m"; return 0; }
  done
  echo "SoftHSM module not found (Debian package softhsm2)" >&2
  return 1
}

# multiarch_module NAME: /usr/lib/<triplet>/pkcs11/NAME
multiarch_module() {
  local m
  for m in /usr/lib/x86_64-linux-gnu/pkcs11/"$1" /usr/lib/aarch64-linux-gnu/pkcs11/"$1"; do
    [ -e "$m" ] && { echo "$m"; return 0; }
  done
  echo "PKCS#11 module $1 not found" >&2
  return 1
}

# softhsm_token DIR: a SoftHSM token store under DIR/softhsm with one token (once)
softhsm_token() {
  local dir=$1
  local conf="$dir/softhsm2.conf"
  make_pins "$dir"
  if [ ! -f "$conf" ]; then
    mkdir -p "$dir/tokens"
    printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
      "$dir/tokens" > "$conf"
    SOFTHSM2_CONF="$conf" softhsm2-util --init-token --free --label "$(cat "$dir/label")" \
      --so-pin "$(cat "$dir/so.pin")" --pin "$(cat "$dir/user.pin")" >/dev/null
  fi
}

# pkcs11_init_token MODULE DIR [pkcs11-tool slot args...]: C_InitToken + C_InitPIN by pkcs11-tool
pkcs11_init_token() {
  local module=$1 dir=$2
  shift 2
  local label so user
  label=$(cat "$dir/label")
  so=$(cat "$dir/so.pin")
  user=$(cat "$dir/user.pin")
  pkcs11-tool --module "$module" "$@" --init-token --label "$label" --so-pin "$so" >/dev/null
  pkcs11-tool --module "$module" --token-label "$label" --login --login-type so --so-pin "$so" \
    --init-pin --pin "$user" >/dev/null
}
