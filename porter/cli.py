"""The `porter` command line: convert, verify, run. Each command lives in porter/commands/."""
import typer

app = typer.Typer(
    help="Port HuggingFace modeling files to engine-ready inference models, and prove them right.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

from porter.commands import run as _run  # noqa: E402

_run.register(app)
from porter.commands import verify as _verify; _verify.register(app)  # noqa: E402,E702
from porter.commands import convert as _convert; _convert.register(app)  # noqa: E402,E702

if __name__ == "__main__":  # pragma: no cover
    app()
