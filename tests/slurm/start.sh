#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (munged, slurmctld, slurmd as root), for
# tests/test_launcher.py. Installs Debian's slurm-wlm and munge first when they are missing
# (needs root and apt). Idempotent: does nothing when `sinfo` already answers.
# Exit 0 when the cluster takes jobs, non-zero (with the reason on stderr) otherwise.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if sinfo -h -o %T >/dev/null 2>&1 && [ -n "$(sinfo -h -o %T 2>/dev/null | grep -E 'idle|mix|alloc')" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then echo "slurm: not root, cannot start slurmctld/slurmd" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || { echo "slurm: no apt-get to install slurm-wlm" >&2; exit 1; }
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge) \
        >/tmp/capbench-slurm-install.log 2>&1 \
        || { echo "slurm: apt-get install slurm-wlm munge failed (/tmp/capbench-slurm-install.log)" >&2; exit 1; }
fi
host="$(hostname -s)"
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cpus=$(nproc); [ "$cpus" -gt 2 ] && cpus=2  # two array tasks at once; never more than the host has
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
sed -e "s/@HOST@/$host/g" -e "s/@MEM@/$mem/g" -e "s/@CPUS@/$cpus/g" "$here/slurm.conf.in" > /etc/slurm/slurm.conf
# munge: a key, then the daemon as its own user
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null
chmod 400 /etc/munge/munge.key
munge -n </dev/null >/dev/null 2>&1 || runuser -u munge -- munged || { echo "slurm: munged did not start" >&2; exit 1; }
pgrep -x slurmctld >/dev/null || slurmctld || { echo "slurm: slurmctld did not start" >&2; exit 1; }
pgrep -x slurmd >/dev/null || slurmd || { echo "slurm: slurmd did not start" >&2; exit 1; }
for _ in $(seq 1 30); do
    state="$(sinfo -h -o %T 2>/dev/null)"
    case "$state" in idle*|mix*|alloc*) exit 0 ;; esac
    if [[ "$state" == down* || "$state" == drain* ]]; then scontrol update nodename="$host" state=resume 2>/dev/null; fi
    sleep 1
done
echo "slurm: the node did not come up (sinfo: ${state:-no answer}; /var/log/slurm/)" >&2
exit 1
