#!/bin/sh
# Liveness/readiness probe of an alignd Celery worker: succeeds while the worker's heartbeat file
# is younger than MAX_AGE seconds.
#
#   worker-heartbeat-check.sh MAX_AGE [FILE]      FILE defaults to $ALIGND_HOME/worker-heartbeat
#
# The worker touches the file on every Celery event heartbeat (celery.signals.heartbeat_sent,
# every 2 s while its consumer loop runs) and from the job heartbeat thread while a round runs
# (a solo-pool GPU worker's consumer loop is blocked for the whole round). A file probe costs
# nothing, needs no broker round trip, and does not restart workers when Redis blips, unlike
# `celery inspect ping`, which also cannot answer while a solo-pool worker is busy.
set -eu

max_age="${1:?usage: worker-heartbeat-check.sh MAX_AGE_SECONDS [FILE]}"
file="${2:-${ALIGND_HOME:-/var/lib/alignd}/worker-heartbeat}"

if [ ! -f "$file" ]; then
    echo "no heartbeat yet: $file" >&2
    exit 1
fi
now=$(date +%s)
beat=$(stat -c %Y "$file")
age=$((now - beat))
if [ "$age" -gt "$max_age" ]; then
    echo "heartbeat is ${age}s old (limit ${max_age}s): $file" >&2
    exit 1
fi
