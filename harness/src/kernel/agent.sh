#!/bin/sh
# hvo-harness agent: /init (PID 1) of the initramfs the harness writes for a
# real Linux kernel, run by busybox-static's sh. It speaks the console line
# protocol of abi/src/protocol.rs:
#   "@hvo ready abi=<n> arch=<name>" once, then for each "<seq> <verb> [args]"
#   line read, one "@hvo <seq> ok [payload]" or "@hvo <seq> err <message>"
#   ("@hvo - err ..." when the line carries no sequence number).
# Everything else printed is free text. Replies stay under 480 bytes.
#
# The host's unit tests run this same script under the host's sh against a
# fake /proc and /sys: HVO_AGENT_ROOT prefixes every kernel path, and the
# PID 1 set-up (mounts, console, poweroff) happens only when it is unset;
# HVO_AGENT_INSMOD names the program that loads a module file.
ABI=@ABI@
R=${HVO_AGENT_ROOT:-}
INSMOD=${HVO_AGENT_INSMOD:-insmod}
export PATH=/bin:$PATH

if [ -z "$R" ]; then
  mount -t proc proc /proc
  mount -t sysfs sys /sys
  mount -t devtmpfs dev /dev 2>/dev/null
  # printk on the console would split reply lines: keep only emergencies.
  echo 1 > /proc/sys/kernel/printk
  exec </dev/console >/dev/console 2>&1
  stty -echo 2>/dev/null
  # The firmware's or kernel's last console output may end without a
  # newline (pseries' VOF): the banner must start a line of its own.
  echo
fi

# The modules the host put in the initramfs, dependencies first.
MODULES=$R/lib/modules
LOADED=
FAILED=
if [ -r $MODULES/load-order ]; then
  while read -r m; do
    [ -n "$m" ] || continue
    if $INSMOD $MODULES/$m.ko; then LOADED=$LOADED${LOADED:+,}$m; else FAILED=$FAILED${FAILED:+,}$m; fi
  done < $MODULES/load-order
fi

HUGEPAGES=$R/sys/kernel/mm/hugepages
SYSCTL=$R/proc/sys/vm/hugetlb_optimize_vmemmap
BTF=$R/sys/kernel/btf/vmlinux
# The kernel's base page size, in KiB, as the kernel maps this very process.
PAGE_KB=$(awk '/^KernelPageSize:/ {print $2; exit}' $R/proc/self/smaps)
read RELEASE < $R/proc/sys/kernel/osrelease
MACHINE=$(uname -m)
# The project's name for this kernel's architecture, so the host can tell a
# kernel that does not match the profile it meant to boot.
case "$MACHINE.$PAGE_KB" in
  x86_64.4) ARCH=x86_64 ;;
  aarch64.4) ARCH=aarch64 ;;
  ppc64le.4) ARCH=ppc64le ;;
  ppc64le.64) ARCH=ppc64le-64k ;;
  *) ARCH=unknown-$MACHINE-${PAGE_KB}k ;;
esac

SEQ=-
reply() { echo "@hvo $SEQ $*"; }

sysctl_hvo() {
  if [ -r $SYSCTL ]; then cat $SYSCTL; else echo absent; fi
}

# "2048:64:64,1048576:1:1": size in KiB, pages, free pages, per hstate.
hstates() {
  out=
  for d in $HUGEPAGES/hugepages-*kB; do
    [ -d "$d" ] || continue
    size=${d##*/hugepages-}
    read nr < $d/nr_hugepages
    read free < $d/free_hugepages
    out=$out${out:+,}${size%kB}:$nr:$free
  done
  echo "$out"
}

# "2048,1048576": the hstate sizes in KiB.
hstate_sizes() {
  out=
  for d in $HUGEPAGES/hugepages-*kB; do
    [ -d "$d" ] || continue
    size=${d##*/hugepages-}
    out=$out${out:+,}${size%kB}
  done
  echo "$out"
}

# " nr_memmap_pages=N nr_memmap_boot_pages=N", what /proc/vmstat has of them.
memmap_counts() {
  awk '/^nr_memmap_pages / || /^nr_memmap_boot_pages / {printf " %s=%s", $1, $2; if (++n == 2) exit}' $R/proc/vmstat
}

is_number() {
  case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac
}

# hugetlb_resize VERB SIZE_KB COUNT SIGN: grow or shrink an hstate's pool by
# COUNT pages; a pool that moved by less is put back and refused.
hugetlb_resize() {
  verb=$1 kb=$2 count=$3 sign=$4
  if ! is_number "$kb" || ! is_number "$count"; then reply err "$verb: bad size or count"; return; fi
  f=$HUGEPAGES/hugepages-${kb}kB/nr_hugepages
  if [ ! -w $f ]; then reply err "$verb: no ${kb}kB hstate"; return; fi
  read before < $f
  want=$((before + sign * count))
  echo $want > $f 2>/dev/null
  read after < $f
  if [ "$after" != "$want" ]; then
    echo $before > $f 2>/dev/null
    reply err "$verb: ${kb}kB pool moved $before -> $after of $want"
  else
    reply ok size_kb=$kb nr=$after
  fi
}

# A number the host sent: decimal, or hexadecimal with 0x.
is_value() {
  case "$1" in
    0x*) case "${1#0x}" in ''|*[!0-9a-fA-F]*) return 1 ;; *) return 0 ;; esac ;;
    *) is_number "$1" ;;
  esac
}

hex() { printf '0x%x' "$(($1))"; }

# Milliseconds since boot, for the time a wait took.
uptime_ms() { awk '{printf "%d", $1 * 1000; exit}' $R/proc/uptime; }

# write VALUE FILE: writes a sysfs attribute; on failure, says why in $WHY.
write() {
  if WHY=$( { echo "$1" > "$2"; } 2>&1 ); then return 0; fi
  WHY="writing '$1' to ${2#$R}: ${WHY##*: }"
  return 1
}

ND=$R/sys/bus/nd
DAX=$R/sys/bus/dax

# What a DAX step lacks when the nvdimm and dax drivers are not there.
dax_missing() {
  for need in $ND/devices:libnvdimm $ND/drivers/dax_pmem:dax_pmem $DAX/drivers/device_dax:device_dax; do
    dir=${need%:*}
    [ -d "$dir" ] && continue
    echo "no ${dir#$R}: ${need##*:} is not loaded (modules loaded: ${LOADED:-none}${FAILED:+; failed: $FAILED})"
    return
  done
}

# Finds a pmem region with a dax seed and a namespace no device holds; sets
# REGION (its directory), SEED and NS, or HELD when a namespace is held.
# libnvdimm registers regions and namespaces asynchronously: reading a
# bus's wait_probe returns once they are all there.
find_region() {
  for b in $ND/devices/ndbus*; do
    [ -r "$b/wait_probe" ] && read _ < $b/wait_probe
  done
  for r in $ND/devices/region*; do
    [ -r "$r/dax_seed" ] || continue
    read SEED < $r/dax_seed
    [ -n "$SEED" ] || continue
    for n in $r/namespace*.*; do
      [ -r "$n/size" ] || continue
      holder=
      [ -r "$n/holder" ] && read holder < $n/holder
      if [ -n "$holder" ]; then HELD="${n##*/} is held by $holder"; continue; fi
      read size < $n/size
      [ "$size" != 0 ] || continue
      REGION=$r NS=${n##*/}
      return 0
    done
  done
  return 1
}

# dax-create MODE ALIGN: a device-dax instance over a whole pmem namespace,
# its struct pages in RAM (ram) or on the device (pmem), mapped in ALIGN
# bytes. Replies with the device, its data range, and the namespace's range.
dax_create() {
  mode=$1 align=$2
  case "$mode" in ram|pmem) ;; *) reply err "dax-create: mode must be ram or pmem"; return ;; esac
  if ! is_number "$align"; then reply err "dax-create: bad align"; return; fi
  missing=$(dax_missing)
  if [ -n "$missing" ]; then reply err "dax-create: $missing"; return; fi
  HELD=
  if ! find_region; then
    reply err "dax-create: no pmem region with a free namespace under ${ND#$R}/devices${HELD:+ ($HELD)}"
    return
  fi
  ns=$REGION/$NS seed=$REGION/$SEED
  # The namespace's own driver (nd_pmem) lets go of it first.
  if [ -e $ns/driver ] && ! write $NS $ns/driver/unbind; then reply err "dax-create: $WHY"; return; fi
  read uuid < $R/proc/sys/kernel/random/uuid
  for attr in uuid:$uuid mode:$mode align:$align namespace:$NS; do
    if ! write ${attr#*:} $seed/${attr%%:*}; then
      if [ ${attr%%:*} = align ] && [ -r $seed/supported_alignments ]; then
        read supported < $seed/supported_alignments
        WHY="$WHY (supported: $supported)"
      fi
      reply err "dax-create: $WHY"
      return
    fi
  done
  if ! write $SEED $ND/drivers/dax_pmem/bind; then
    why=$WHY
    write "" $seed/namespace
    reply err "dax-create: $why"
    return
  fi
  dev=
  for d in $seed/dax*.*; do [ -d "$d" ] && dev=${d##*/}; done
  if [ -z "$dev" ] || [ ! -d $DAX/devices/$dev ]; then
    reply err "dax-create: $SEED bound to dax_pmem but made no device under ${DAX#$R}/devices"
    return
  fi
  d=$DAX/devices/$dev
  read start < $d/resource; read size < $d/size; read dalign < $d/align
  read nmode < $seed/mode; read ns_start < $ns/resource; read ns_size < $ns/size
  reply ok dev=$dev nd=$SEED start=$(hex $start) size=$(hex $size) align=$dalign mode=$nmode \
    ns_start=$(hex $ns_start) ns_size=$(hex $ns_size)
}

# dax-destroy DEV: unbinds the nd dax device behind DEV from dax_pmem (which
# removes DEV and its struct pages) and lets go of its namespace. The
# namespace is left without a driver: nd_pmem would find the dax info block
# on it and make the device again.
dax_destroy() {
  dev=$1
  case "$dev" in dax[0-9]*.[0-9]*) ;; *) reply err "dax-destroy: '$dev' is no daxX.Y name"; return ;; esac
  if [ ! -e $DAX/devices/$dev ]; then reply err "dax-destroy: no ${DAX#$R}/devices/$dev"; return; fi
  nd=$(readlink -f $DAX/devices/$dev)
  nd=${nd%/*}
  if ! write ${nd##*/} $ND/drivers/dax_pmem/unbind; then reply err "dax-destroy: $WHY"; return; fi
  if ! write "" $nd/namespace; then reply err "dax-destroy: $WHY"; return; fi
  if [ -e $DAX/devices/$dev ]; then reply err "dax-destroy: ${DAX#$R}/devices/$dev is still there"; return; fi
  reply ok dev=$dev nd=${nd##*/}
}

MEMORY=$R/sys/devices/system/memory

# mem_wait VERB START SIZE [SECONDS]: waits, polling every 0.1 s for at
# most SECONDS (20), until every memory block of [START, START+SIZE) is
# online (mem-online) or none of them exists any more (mem-gone).
mem_wait() {
  verb=$1 start=$2 size=$3 secs=${4:-20}
  if ! is_value "$start" || ! is_value "$size" || ! is_number "$secs"; then
    reply err "$verb: bad start, size or seconds"; return
  fi
  if [ ! -r $MEMORY/block_size_bytes ]; then reply err "$verb: no ${MEMORY#$R}/block_size_bytes"; return; fi
  read bs < $MEMORY/block_size_bytes
  bs=$((0x$bs))
  if [ $((start % bs)) -ne 0 ] || [ $((size % bs)) -ne 0 ] || [ $((size)) -eq 0 ]; then
    reply err "$verb: $start+$size is not whole memory blocks of $(hex $bs)"; return
  fi
  first=$((start / bs)) last=$(((start + size) / bs - 1))
  t0=$(uptime_ms) tries=$((secs * 10))
  while :; do
    bad= nbad=0 zones=
    n=$first
    while [ $n -le $last ]; do
      b=$MEMORY/memory$n
      if [ $verb = mem-gone ]; then
        [ -d $b ] && { nbad=$((nbad + 1)); [ $nbad -le 4 ] && bad="$bad memory$n"; }
      elif [ ! -d $b ]; then
        nbad=$((nbad + 1)); [ $nbad -le 4 ] && bad="$bad memory$n(missing)"
      else
        read state < $b/state
        if [ "$state" != online ]; then
          nbad=$((nbad + 1)); [ $nbad -le 4 ] && bad="$bad memory$n($state)"
        else
          # An online block's valid_zones is the zone it is in.
          read zone < $b/valid_zones
          case ",$zones," in *",$zone,"*) ;; *) zones=$zones${zones:+,}$zone ;; esac
        fi
      fi
      n=$((n + 1))
    done
    [ $nbad -eq 0 ] && break
    if [ $tries -le 0 ]; then
      [ $nbad -gt 4 ] && bad="$bad and $((nbad - 4)) more"
      if [ $verb = mem-gone ]; then reply err "$verb: after ${secs}s still there:$bad"
      else reply err "$verb: after ${secs}s not online:$bad"; fi
      return
    fi
    tries=$((tries - 1))
    sleep 0.1
  done
  waited=$(($(uptime_ms) - t0))
  if [ $verb = mem-gone ]; then reply ok blocks=$((last - first + 1)) waited_ms=$waited
  else reply ok blocks=$((last - first + 1)) zone=$zones waited_ms=$waited; fi
}

echo "@hvo ready abi=$ABI arch=$ARCH"
while read -r SEQ VERB ARGS; do
  if [ -z "$SEQ" ]; then continue; fi
  if ! is_number "$SEQ"; then SEQ=-; reply err command must start with a sequence number; continue; fi
  # Arguments are words: no glob expansion of what the host sent.
  set -f; set -- $ARGS; set +f
  case "$VERB" in
    ping)
      reply ok pong${1:+ $1} ;;
    kernel)
      btf=no; [ -r $BTF ] && btf=yes
      reply ok release=$RELEASE machine=$MACHINE page_kb=$PAGE_KB hvo=$(sysctl_hvo) hstates=$(hstate_sizes) btf=$btf \
        modules=$LOADED modules_failed=$FAILED ;;
    report)
      reply ok hvo=$(sysctl_hvo)$(memmap_counts) hstates=$(hstates) ;;
    hugetlb-alloc)
      # Optimization applies to pages allocated after the sysctl says so.
      if [ -w $SYSCTL ] && ! echo 1 > $SYSCTL; then reply err "hugetlb-alloc: cannot turn hugetlb_optimize_vmemmap on"
      else hugetlb_resize hugetlb-alloc "$1" "$2" 1; fi ;;
    hugetlb-free)
      hugetlb_resize hugetlb-free "$1" "$2" -1 ;;
    ksyms)
      # One pass over kallsyms that stops once every wanted name was seen:
      # the file is 200k lines and slow to generate under TCG.
      if [ $# -eq 0 ]; then reply err "ksyms: missing symbol names"; continue; fi
      found=$(awk -v want="$*" '
        BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) need[w[i]] = 1 }
        ($3 in need) { printf " %s=0x%s", $3, $1; delete need[$3]; if (--n == 0) exit }' $R/proc/kallsyms)
      reply ok$found ;;
    btf-has)
      if [ -z "$1" ]; then reply err "btf-has: missing name"
      elif [ ! -r $BTF ]; then reply err "btf-has: the kernel has no BTF"
      elif tr '\000' '\n' < $BTF | grep -qxF "$1"; then reply ok $1=yes
      else reply ok $1=no; fi ;;
    dax-create)
      dax_create "$1" "$2" ;;
    dax-destroy)
      dax_destroy "$1" ;;
    mem-online)
      mem_wait mem-online "$1" "$2" "$3" ;;
    mem-gone)
      mem_wait mem-gone "$1" "$2" "$3" ;;
    exit)
      reply ok
      if [ -z "$R" ]; then sync; poweroff -f; fi
      exit 0 ;;
    *)
      reply err "unknown command '$VERB'" ;;
  esac
done
echo "@hvo crash: console closed"
if [ -z "$R" ]; then poweroff -f; fi
exit 1
