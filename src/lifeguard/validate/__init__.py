"""``lifeguard validate``: the commonly recommended load test, automated against running workers.

* :mod:`.workers`: the workers consuming the task's queue, and their task processes' RSS;
* :mod:`.load`: the task sent through the user's app, outcomes read back;
* :mod:`.sampler`: connections by state and per worker process, RSS, all along the run;
* :mod:`.criteria`: pass or fail, from the samples and outcomes;
* :mod:`.charts`: the report's charts and tables (:mod:`lifeguard.report`);
* :mod:`.run`: the phases, in order: warm-up, baseline, burst, drain, soak, settle, final.
"""
