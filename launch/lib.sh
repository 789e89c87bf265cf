# Helpers shared by launch/tpu_vm.sh and launch/gpu_multinode.sh (sourced, not run).
# The sourcing script defines PROG (its name, for messages) and DRY_RUN (0 or 1).
# shellcheck shell=bash

die() {
  echo "$PROG: $*" >&2
  exit 2
}

# Shell-quote one word so that the printed command can be pasted into bash
# (and split back with Python's shlex): safe words stay bare.
q() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# All arguments quoted and joined by spaces.
join_q() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(q "$word")"
  done
  printf '%s' "$out"
}

# Run a command, or print it in --dry-run; real runs echo it to stderr first.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(join_q "$@")"
  else
    printf '+ %s\n' "$(join_q "$@")" >&2
    "$@"
  fi
}

# Value of an option given as --opt=VALUE or --opt VALUE: sets VALUE and
# SHIFT_BY (how many arguments the caller's parser shifts), read by the caller.
value_of() {
  local opt=$1 next_set=$2 next=${3-}
  if [[ $opt == *=* ]]; then
    VALUE=${opt#*=}
    SHIFT_BY=1
  elif ((next_set)) && [[ $next != --* ]]; then
    VALUE=$next
    SHIFT_BY=2
  else
    die "option '$opt' needs a value"
  fi
  [[ -n $VALUE ]] || die "option '${opt%%=*}' needs a non-empty value"
}
