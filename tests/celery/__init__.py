"""In-process Celery tests: one session app and one solo-pool worker thread on the memory transport."""
