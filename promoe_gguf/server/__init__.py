"""`promoe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one Engine."""
from .app import build_app
from .scheduler import Job, QueueFull, Scheduler

__all__ = ["build_app", "Job", "QueueFull", "Scheduler"]
