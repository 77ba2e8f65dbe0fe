"""`m2io`: the command line of the local cluster and of every stage.

Every command is registered here, in the order `m2io --help` lists them; each lives in one
module over the library and `services.client` (`cluster`, `ingest`, `jobs`, `train`, `demo`),
and shares only `ui` with the others.
"""

from __future__ import annotations

import typer

from services.cli import cluster, demo, ingest, jobs, train
from services.cli.ui import one_line_errors

app = typer.Typer(
    help="m2io: multimodal RAG whose answers put the right images at the right places.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(cluster.migrate_app, name="migrate")

# In `m2io --help` order; a command is named after its function (`ingest_status`: ingest-status).
COMMANDS = (
    (cluster.up, cluster.ps, cluster.down, cluster.worker, cluster.smoke),
    (ingest.ingest, ingest.ingest_status, ingest.search),
    (jobs.submit, jobs.status, jobs.export, jobs.retry, jobs.cancel, jobs.evaluate, demo.demo),
    (train.train_data, train.train, train.train_status, train.train_cancel, train.models),
)
RENAMED = {jobs.evaluate: "eval"}  # a function named `eval` would shadow the builtin
for group in COMMANDS:
    for command in group:
        # A server that is down or a path that is not a folder is one line naming the fix, never a traceback.
        app.command(RENAMED.get(command))(one_line_errors(command))

if __name__ == "__main__":
    app()
