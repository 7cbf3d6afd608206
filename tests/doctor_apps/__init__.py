"""Small Celery apps for the doctor's scenarios: each module has one mistake (or none).

They are loaded by ``lifeguard doctor -A tests.doctor_apps.<module>`` in a subprocess, so
each gets a fresh interpreter (Django settings and SQLAlchemy engines are process-wide).
Knobs are environment variables named ``DOCTOR_*``.
"""
