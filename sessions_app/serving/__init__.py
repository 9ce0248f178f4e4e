"""The gunicorn worker and its logger, and the host-wide rate-limit counters."""
