"""The drivers: the loops that take a model and batches through capture, statistics and decisions to a
state (in memory, or block by block for models bigger than memory), and the heavy half of the job.
"""
