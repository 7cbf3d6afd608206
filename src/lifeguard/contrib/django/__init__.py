"""lifeguard's Django app: the doctor's findings in Django's system checks.

Add ``"lifeguard.contrib.django"`` to ``INSTALLED_APPS``; ``manage.py check`` (and every
command that runs the checks) then reports the findings of ``lifeguard doctor`` that
need neither a worker nor the database, as ``lifeguard.LG001`` ... ;
``manage.py check --database default`` adds the server rules. See docs/doctor.md.
"""
