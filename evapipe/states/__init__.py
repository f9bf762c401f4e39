"""What a run leaves behind: the versioned state file and its metadata, the store of states per task,
checkpoints for resume, re-budgeting and reports.
"""
