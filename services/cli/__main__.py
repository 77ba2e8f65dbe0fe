"""`python -m services.cli`: the `m2io` command without the installed script."""

from services.cli.app import app

if __name__ == "__main__":
    app()
