"""CorDA, the second data-driven method: per-layer input covariances over the task data and the
context-oriented decomposition of each weight, through the same data, model and state parts as EVA.
"""
