"""The library side of the entry points: evaluate, predict, inspect, export, summary."""
