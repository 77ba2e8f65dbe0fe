"""`m2io`: the command line of the local cluster and of every stage.

Every command is registered here, in the order `m2io --help` lists them; each lives in one
module over the library and `services.client` (`cluster`, `ingest`, `jobs`, `train`, `demo`),
and shares only `ui` with the others.
"""

from __future__ import annotations

import typer

from services.cli import cluster, demo, ingest, jobs, train

app = typer.Typer(
    help="m2io: multimodal RAG whose answers put the right images at the right places.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(cluster.migrate_app, name="migrate")

app.command()(cluster.up)
app.command()(cluster.ps)
app.command()(cluster.down)
app.command()(cluster.worker)
app.command()(cluster.smoke)

app.command()(ingest.ingest)
app.command("ingest-status")(ingest.ingest_status)
app.command()(ingest.search)

app.command()(jobs.submit)
app.command()(jobs.status)
app.command()(jobs.export)
app.command()(jobs.retry)
app.command()(jobs.cancel)
app.command("eval")(jobs.evaluate)
app.command()(demo.demo)

app.command("train-data")(train.train_data)
app.command()(train.train)
app.command("train-status")(train.train_status)
app.command("train-cancel")(train.train_cancel)
app.command()(train.models)

if __name__ == "__main__":
    app()
