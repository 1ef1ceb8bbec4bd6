"""State stores: where runs, tasks and attempts are recorded (sqlite locally, dynamodb on AWS)."""

from corral.state.base import StateStore

__all__ = ["StateStore"]
