"""POSIX sh shared by the scripts corral runs inside containers: the AWS item wrapper
(:data:`corral.backends.aws_batch.payloads.WRAPPER`) and the transfer script
(:data:`corral.storage.aws.TRANSFER_SCRIPT`). Plain strings, no imports: both include them.

``run_forwarding CMD [ARG...]`` runs the command in the background, forwards SIGTERM/INT/HUP to it
(Batch stops a job with SIGTERM to the container's first process, the script; ``sh`` would not pass
it on to a foreground child), waits until it has really exited (``wait`` returns early when a
trapped signal arrives) and leaves its exit status in ``rc``; a signal received sets ``stop=1``.
It returns 0 and restores ``set -e`` and the default signal dispositions.
"""

RUN_FORWARDING = """run_forwarding() {
  "$@" &
  p=$!
  trap 'stop=1; kill -TERM "$p" 2>/dev/null || :' TERM INT HUP
  set +e
  wait "$p"
  rc=$?
  while kill -0 "$p" 2>/dev/null; do wait "$p"; rc=$?; done
  set -e
  trap - TERM INT HUP
}
"""
