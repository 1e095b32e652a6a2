"""Training: the loop (``loop.train_and_evaluate``), its setup, resume, hooks, steps, state and
optimizer.
"""
