"""Serving many tasks from one frozen backbone: the prompt bank, the batching engine, the HTTP API."""

from .bank import PromptBank, TaskEntry, UnknownTask

__all__ = ["PromptBank", "TaskEntry", "UnknownTask"]
