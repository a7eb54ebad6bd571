"""Attention Specialization Routing (paper Sec. 3.3.2, Algorithm 1): statistics, assignment,
calibration over many videos, routing files."""

from .assign import HeadAssignment, assign_heads, global_head_count
from .calibrate import LayerRouting, RoutingCalibrator, RoutingFile, load_routing, routing_agreement
from .stats import HeadStatistics, head_statistics, head_statistics_reference

__all__ = [
    "HeadStatistics", "head_statistics", "head_statistics_reference",
    "HeadAssignment", "assign_heads", "global_head_count",
    "RoutingCalibrator", "RoutingFile", "LayerRouting", "load_routing", "routing_agreement",
]
