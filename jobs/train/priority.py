"""CPU scheduling of a train job's processes, for nodes whose cores all run ranks.

Data-parallel ranks run in lockstep: a rank preempted for a millisecond stalls every other
rank for that millisecond at the next collective. Besides the ranks' training threads, a Ray
Train job runs threads that need little CPU but wake often: every Ray worker's main thread
checks for signals every 10 ms (Ray's ``CoreWorker.CheckSignal``, which takes the GIL), in
each rank and in each of Ray Train's helper actors (controller, synchronisation, placement
group cleaner, autoscaling coordinator, preemption watcher, dataset manager). With 2 ranks
that was about 830 wake-ups a second, each a chance to preempt a rank.

Those threads are put under ``SCHED_IDLE``: the kernel runs them when a core has nothing else
to run (ranks wait at every collective, so these threads still get a core), and a waking
one never preempts a rank. What stays at normal priority: each rank's training thread and the
threads it starts (gloo's or NCCL's, DeepSpeed's, the metrics exporter, the hang watchdog).
A thread cannot leave ``SCHED_IDLE`` without privileges, which is why the rank's own process
is handled from its training thread, not by the setup hook.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

# Set in the ranks' runtime environment: the setup hook leaves their processes alone.
RANK_ENV = "CRUCIBLE_TRAIN_RANK"
# Ray's runtime-env field for a function every worker process of the job runs at start.
SETUP_HOOK = "crucible.jobs.train.priority.yield_to_ranks"


def idle_threads(exclude: frozenset[int] = frozenset()) -> int:
    """Put every thread of this process but ``exclude`` (native ids) under ``SCHED_IDLE``.

    Threads inherit their creator's policy, so a thread started meanwhile by one not yet
    changed is caught by the next pass; passes repeat until one changes nothing. Where the
    policy does not exist (not Linux) or the call is refused (a seccomp filter), nothing
    changes: priority is an optimisation, never a reason to fail a job.

    Args:
        exclude: native thread ids to leave as they are.

    Returns:
        The number of threads changed.
    """
    if not hasattr(os, "SCHED_IDLE"):
        return 0
    changed = 0
    for _ in range(5):
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            return changed
        before = changed
        for tid in tids:
            if tid in exclude:
                continue
            try:
                if os.sched_getscheduler(tid) != os.SCHED_IDLE:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                    changed += 1
            except ProcessLookupError:  # the thread exited meanwhile
                continue
            except OSError as e:
                log.debug("SCHED_IDLE refused for thread %d: %s", tid, e)
                return changed
        if changed == before:
            break
    return changed


def yield_to_ranks() -> None:
    """Ray ``worker_process_setup_hook`` of a train job: every worker process of the job
    except the ranks (Ray Train's controller and helper actors) runs under ``SCHED_IDLE``."""
    if not os.environ.get(RANK_ENV):
        idle_threads()


def yield_rank_helpers() -> int:
    """In a rank, from its training thread and before the process group starts: every other
    thread of the process (Ray's main thread and core-worker threads) under ``SCHED_IDLE``;
    return how many changed."""
    return idle_threads(frozenset({threading.get_native_id()}))
