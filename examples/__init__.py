"""Example WorkerLogics; run them as scripts or with `psworker --logic examples.<module>:<Class>`."""
