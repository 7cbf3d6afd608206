"""A small Django project and Celery app used by ``lifeguard demo``, the tests and benchmarks.

Everything is set from ``LIFEGUARD_SANDBOX_*`` environment variables, so one project
plays every configuration compared: stock Celery, Celery's ``CELERY_DB_REUSE_MAX``,
lifeguard, with or without Django's native pool, on psycopg 3 or psycopg2.
"""
