"""The worker runtime and the WorkerLogic plugin API."""

from psworker.logic import ParameterServerClient, WorkerLogic, with_pull_limit

__all__ = ["ParameterServerClient", "WorkerLogic", "with_pull_limit"]
