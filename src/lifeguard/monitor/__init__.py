"""The database side: what PostgreSQL shows about the workers, judged and acted upon.

``lifeguard monitor`` and ``lifeguard check`` are built from these parts:

* :mod:`.target`: which database, from the command line, the environment or the app;
* :mod:`.snapshot`: one read of ``pg_stat_activity`` and ``pg_stat_database``;
* :mod:`.thresholds`: findings (warning, critical) from a snapshot;
* :mod:`.attribution`: the Celery task each worker process runs now;
* :mod:`.actions`: terminating stale idle-in-transaction worker backends;
* :mod:`.report`: all of the above for one moment, as text or JSON;
* :mod:`.prometheus`: the report's figures for Prometheus.
"""
