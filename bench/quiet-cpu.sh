# The measured CPU kept for the gateway while a benchmark runs, as latency benchmarks set a
# host up anywhere (tuned's latency-performance profile, isolcpus housekeeping). Sourced by
# bench/run, bench/ab and bench/half-ab; each step is best effort and undone by
# `restore_cpu` (the PM QoS holder also ends by itself once the benchmark's shell is gone);
# BENCH_QUIET=0 makes `quiet_cpu` leave the host as it is.
#
# Why (bench/README.md, twenty-first pass): this VM's kernel threads (kdamond, the memory
# monitor, ran 0.6-5 ms every 0.5 s, once 53 ms) settle on the idler CPU, which is the
# gateway's, so they stall the gateway's requests and never the direct path's (all on the
# other CPU); and an idle vCPU halts at once (the kernel command line sets
# haltpoll.guest_halt_poll_ns=0), so each request that wakes the gateway's CPU pays a VM
# exit the direct path never does. Both are the host's, not the gateway's, and both apply
# to every gateway measured alike.
QUIET_MOVED=() QUIET_WQ= QUIET_QOS=

quiet_cpu() { # measured-cpu housekeeping-cpu; BENCH_QUIET=0 leaves the host as it is
  local cpu=$1 hk=$2 p mask n=0
  if [ "${BENCH_QUIET:-1}" != 1 ]; then echo "host: as it is (BENCH_QUIET=0)"; return; fi
  # Kernel threads (children of kthreadd) that may run on the measured CPU and may be
  # moved; per-CPU ones refuse, and stay.
  for p in $(ps -eo pid=,ppid= | awk '$2 == 2 { print $1 }'); do
    mask=$(taskset -p "$p" 2>/dev/null | awk '{ print $NF }') || continue
    [[ "$mask" =~ ^[0-9a-f]+$ ]] && (((16#$mask >> cpu) & 1)) || continue
    if taskset -pc "$hk" "$p" >/dev/null 2>&1; then QUIET_MOVED+=("$p:$mask"); n=$((n + 1)); fi
  done
  # Unbound workqueues' workers.
  if [ -w /sys/devices/virtual/workqueue/cpumask ]; then
    QUIET_WQ=$(cat /sys/devices/virtual/workqueue/cpumask)
    printf '%x\n' $((1 << hk)) >/sys/devices/virtual/workqueue/cpumask 2>/dev/null || QUIET_WQ=
  fi
  # No CPU halts while the request holds (PM QoS: wake-up latency 0 us, so the idle loop
  # polls); the request lasts while the file stays open, here by a sleeping holder.
  if [ -w /dev/cpu_dma_latency ]; then
    (exec 3>/dev/cpu_dma_latency && printf 0 >&3 &&
      while kill -0 $$ 2>/dev/null; do sleep 2 3>&-; done) 2>/dev/null &
    QUIET_QOS=$!
  fi
  local wq="left where they were" idle="halt (no /dev/cpu_dma_latency)"
  [ -n "$QUIET_WQ" ] && wq="on CPU $hk"
  [ -n "$QUIET_QOS" ] && idle="poll (cpu_dma_latency 0)"
  echo "host: $n kernel threads moved to CPU $hk, unbound workqueues $wq, idle CPUs $idle"
}

restore_cpu() {
  local e
  for e in "${QUIET_MOVED[@]}"; do taskset -p "${e#*:}" "${e%%:*}" >/dev/null 2>&1 || true; done
  QUIET_MOVED=()
  [ -n "$QUIET_WQ" ] && echo "$QUIET_WQ" >/sys/devices/virtual/workqueue/cpumask 2>/dev/null || true
  QUIET_WQ=
  [ -n "$QUIET_QOS" ] && kill "$QUIET_QOS" 2>/dev/null || true
  QUIET_QOS=
}
