"""The Celery app of the dispatcher (`celery -A tasks worker|beat|flower`) and its thin tasks."""
from tasks.app import app

__all__ = ["app"]
