"""The project's tasks: one with time limits (soft and hard), one without."""

from celery import shared_task


@shared_task(soft_time_limit=20, time_limit=30)
def sync_invoices() -> None:
    pass


@shared_task
def send_mail() -> None:
    pass
