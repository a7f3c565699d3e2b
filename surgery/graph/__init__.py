"""Capture and coupling: the model as an fx graph annotated with shapes, channel ids propagated
op by op (``rules``), and the coupled channel groups they form."""

from surgery.graph.capture import Capture, trace
from surgery.graph.groups import OUTPUT, ChannelGroup, Coupling, Probe, Relation, find_groups
from surgery.graph.propagate import Consume, Propagation, Track, Tracks

__all__ = ["Capture", "trace", "Propagation", "Track", "Tracks", "Consume", "ChannelGroup",
           "Coupling", "Probe", "Relation", "OUTPUT", "find_groups"]
