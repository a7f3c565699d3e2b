"""Capture and coupling: the model as an fx graph, channel ids propagated, coupled groups."""
