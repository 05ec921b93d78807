"""Scheduling core: KV block accounting, the scheduler mechanism, plans and policies.

Pure Python, no torch: the engine and the simulator run the very same code.
"""

from sloserve.core.kv_blocks import BlockManager
from sloserve.core.plan import Plan, ScheduledChunk
from sloserve.core.scheduler import Scheduler, SchedulerConfig

__all__ = ["BlockManager", "Plan", "ScheduledChunk", "Scheduler", "SchedulerConfig"]
