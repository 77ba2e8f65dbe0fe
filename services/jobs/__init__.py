"""Batch answer jobs: questions in, interleaved answers out, through the stage queues.

`questions` reads a questions file line by line (a bad line fails alone), `core` submits, tracks,
retries and cancels jobs on the job -> query -> stage-run rows in Postgres, `export` writes the
answers out, `evaluate` scores a finished job against the gold fields. `services.client` wraps them
for scripts and the dashboard.
"""
