#!/usr/bin/env bash
# Real link shaping for clusters, exactly as the original DT-FM did it (egress of one NIC):
#   tools/netem.sh apply IFACE DELAY_MS RATE_GBIT     tc qdisc add dev IFACE root netem delay .. rate .. limit ..
#   tools/netem.sh clear IFACE                        tc qdisc delete dev IFACE root
# --dry-run (first argument) prints the commands instead of running them. Run it on every node.
# Where kernel netem is missing (e.g. the machines jaxpipe is developed on), use jaxpipe's built-in
# emulation instead: --set network.delay_ms=D --set network.rate_gbit=R.
set -euo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
usage() { echo "usage: $0 [--dry-run] apply IFACE DELAY_MS RATE_GBIT | clear IFACE" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1 iface=$2
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
case $action in
  apply)
    [ $# -eq 4 ] || usage
    delay=$3 rate=$4
    is_int "$delay" || { echo "netem.sh: DELAY_MS must be a whole number of milliseconds, got '$delay'" >&2; exit 2; }
    is_int "$rate" || { echo "netem.sh: RATE_GBIT must be a whole number of Gbit/s, got '$rate'" >&2; exit 2; }
    # The original's queue limit: rate × 15000 packets per Gbit·ms × 1.5 × delay (at least 1000).
    limit=$(( rate * 15000 * delay * 3 / 2 ))
    [ "$limit" -ge 1000 ] || limit=1000
    cmd=(tc qdisc add dev "$iface" root netem delay "${delay}ms" rate "${rate}Gbit" limit "$limit");;
  clear)
    [ $# -eq 2 ] || usage
    cmd=(tc qdisc delete dev "$iface" root);;
  *) usage;;
esac
if [ $dry = 1 ]; then echo "${cmd[*]}"; exit 0; fi
command -v tc >/dev/null || { echo "netem.sh: 'tc' (iproute2) is not installed on this host; use jaxpipe's network.* emulation" >&2; exit 3; }
if [ "$action" = apply ] && ! modinfo sch_netem >/dev/null 2>&1 && ! grep -qs sch_netem /proc/modules \
   && ! zgrep -qs 'CONFIG_NET_SCH_NETEM=[ym]' /proc/config.gz "/boot/config-$(uname -r)" 2>/dev/null; then
  echo "netem.sh: kernel netem (sch_netem) is not available on this host; use jaxpipe's network.* emulation" >&2
  exit 3
fi
exec "${cmd[@]}"
