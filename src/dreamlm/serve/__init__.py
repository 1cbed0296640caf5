"""`dreamlm serve`: an OpenAI-compatible HTTP server with iteration-level batching over the step machine."""

from dreamlm.serve.app import Limits, Served, bundled_models, create_app, load_models
from dreamlm.serve.engine import Engine, Job, QueueFull

__all__ = ["Engine", "Job", "Limits", "QueueFull", "Served", "bundled_models", "create_app", "load_models"]
