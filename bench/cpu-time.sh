# A process tree's CPU time, for CPU per request; sourced by bench/run and bench/ab.
# utime + stime (fields 14 and 15 of /proc/PID/stat, all threads) summed over the tree
# (nginx master + worker), in clock ticks.
tree_pids() { echo "$1"; local c; for c in $(pgrep -P "$1" || true); do tree_pids "$c"; done; }
cpu_ticks() { # pid: prints "user system" ticks
  local u=0 s=0 p v w
  for p in $(tree_pids "$1"); do
    read -r v w < <(sed -E 's/^.*\) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12, $13}') || true
    u=$((u + ${v:-0})) s=$((s + ${w:-0}))
  done
  echo "$u $s"
}
