"""SubmitJob's fair-share fields, for queues with a scheduling policy (an ``aws.queue`` of yours).

A job queue with a fair-share scheduling policy refuses a SubmitJob without ``shareIdentifier``
("SubmitJob", AWS Batch API reference: "shareIdentifier ... required for jobs submitted to a job
queue with a scheduling policy"; "Fair-share scheduling policies", Batch user guide). corral's own
queues have no policy, so nothing is added for them. ``schedulingPriorityOverride`` is left out:
corral has no priorities of its own to pass, and without it a job takes the job definition's
``schedulingPriority`` (or 0), as the policy's owner expects. Checked only against that documentation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

DEFAULT_SHARE = "corral"


class FairShare:
    """Whether a queue has a scheduling policy (asked once per queue), and the kwargs it then needs."""

    def __init__(self, describe_queues: Callable[..., dict[str, Any]], share_identifier: str = DEFAULT_SHARE,
                 user_queues: Iterable[str] = ()) -> None:
        self._describe = describe_queues  # batch.describe_job_queues (or a rate-limited wrapper)
        self.share_identifier = share_identifier
        # only a queue of the user's (aws.queue) can have a policy: corral makes its own without one,
        # so no other queue costs a call
        self.user_queues = {q.rsplit("/", 1)[-1] for q in user_queues}
        self._policy: dict[str, bool] = {}

    def has_policy(self, queue: str) -> bool:
        if queue.rsplit("/", 1)[-1] not in self.user_queues:
            return False
        if queue not in self._policy:
            found = self._describe(jobQueues=[queue]).get("jobQueues") or []
            self._policy[queue] = bool(found and found[0].get("schedulingPolicyArn"))
        return self._policy[queue]

    def submit_kwargs(self, queue: str) -> dict[str, Any]:
        """What SubmitJob to ``queue`` must add: ``{"shareIdentifier": ...}`` on a fair-share queue, else nothing."""
        return {"shareIdentifier": self.share_identifier} if self.has_policy(queue) else {}
