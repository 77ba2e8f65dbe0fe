"""The `m2io` command line: Typer commands over the library and `services.client`, no logic of
their own. Command modules (`cluster`, `ingest`, `jobs`, `train`, `demo`) import `ui` and the
library, never each other; `app` registers them all.

`services.cli:app` is the console script's entry point (pyproject's `[project.scripts]`, and every
script already installed from it), so the package re-exports the Typer app: after this import,
`services.cli.app` as an attribute is the app, `sys.modules["services.cli.app"]` the module.
"""

from services.cli.app import app

__all__ = ["app"]
