"""A workaround for a Dagster bug that costs a lab real CPU, applied when the code location loads.

Dagster 1.13's in-process executor asks how long to wait before re-trying a pool slot claim, and gets
``min([0, *intervals])``: never positive, so a run waiting for the ``gpu`` pool re-checks in a busy loop
(about 74 % of a core, per waiting run). The intended interval (an exponential back-off up to 15 s, or
the storage's own) is already computed; this waits for it. Upstream: dagster-io/dagster#20367.
"""

from __future__ import annotations

import time

from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext


def _interval_to_next_pending_claim_check(self) -> float:
    if not self._pending_claims or not self._pending_timeouts:
        return 0.0
    return max(0.0, min(self._pending_timeouts.values()) - time.time())


def apply() -> None:
    InstanceConcurrencyContext.interval_to_next_pending_claim_check = _interval_to_next_pending_claim_check
