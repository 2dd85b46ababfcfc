"""Process-level concerns: the server lifecycle, worker processes, logs."""
