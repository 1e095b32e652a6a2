"""Layers and the math under them: Flax modules, pooling, the from-scratch ops (the reference) and
fast CPU kernels.
"""
