"""The example's Django app: tasks that call a payments API and a mailer."""
