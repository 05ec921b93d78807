"""Discrete-event simulator: the real core/ scheduler driven by a step-latency model.

No torch: `python -c "import sloserve.sim"` works without it.
"""

from sloserve.sim.cluster import Cluster, SimInstance, VirtualClock
from sloserve.sim.run import simulate

__all__ = ["Cluster", "SimInstance", "VirtualClock", "simulate"]
