"""Real services and real workers for ``lifeguard demo``, the tests and the benchmarks.

Nothing here is used by a worker in production: it finds (or starts) a PostgreSQL and a
Redis, and runs ``celery worker`` processes the way a user would.
"""
