#!/bin/sh
# Kubernetes preStop hook of GPU workers: ask the running round to checkpoint, then return at once.
#
# The kubelet sends SIGTERM to the container's main process only: the Celery worker, which
# answers with a warm shutdown (no new tasks; wait for the running one). Training ranks started
# by `accelerate launch` never see that signal. The drain file is seen by every process in the
# pod: the training loop checks it at each optimizer step, saves a checkpoint, stops, and the
# task hands the job back to the queue; the warm shutdown then ends. Sleeping here would only
# delay SIGTERM and spend the grace period, which already has to cover one training step plus a
# checkpoint save (terminationGracePeriodSeconds).
set -eu

home="${ALIGND_HOME:-/var/lib/alignd}"
mkdir -p "$home"
date -u +%Y-%m-%dT%H:%M:%SZ > "$home/drain"
