"""The `m2io` command line (`services.cli.app:app`): Typer commands over the library and
`services.client`, no logic of their own. Command modules import `ui` and the library, never
each other; `app` registers them all."""
