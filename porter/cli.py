"""The `porter` command line: convert, verify, run. Each command lives in porter/commands/."""
import typer

from porter.commands import convert, run, verify

app = typer.Typer(
    help="Port HuggingFace modeling files to engine-ready inference models, and prove them right.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

for command in (convert, verify, run):  # the order `porter --help` lists them in
    command.register(app)

if __name__ == "__main__":  # pragma: no cover
    app()
