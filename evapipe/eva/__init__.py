"""EVA's statistics and decisions: the incremental PCA, the rank budget, convergence planning, what ranks
agree on each step, and the checks that stop a run that cannot converge.
"""
