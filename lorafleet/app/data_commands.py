"""``lorafleet data fetch``: the public data sets, downloaded, checked and converted
(lorafleet/data/fetch.py; the sources and their pins are lorafleet/data/sources.py's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafleet.data.fetch import fetch_dataset, source_of
from lorafleet.settings import env_name, load_settings

data_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="The public data sets: 'lorafleet data fetch sst2'."
)


def default_data_dir() -> Path:
    """Where ``fetch`` writes without ``--dir``: the data directory setting (lorafleet/settings.py),
    else ``../shared/data`` relative to the working directory (the first place the loaders look)."""
    configured = load_settings().data_dir
    return configured if configured is not None else Path.cwd().parent / "shared" / "data"


@data_app.command()
def fetch(
    name: Annotated[str, typer.Argument(help="sst2 or 20newsgroups")],
    url: Annotated[
        str | None, typer.Option("--url", help="Download from this URL (a mirror) instead")
    ] = None,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", help=f"The data directory (default: ${env_name('data_dir')}, else ../shared/data)"
        ),
    ] = None,
    sha256: Annotated[
        str | None,
        typer.Option("--sha256", help="Expect this sha256 of the archive instead of the pinned checksum"),
    ] = None,
) -> None:
    """Download a public data set, refuse it unless its checksum is the pinned one, and convert it to
    the layout the loaders read (DIR/sst2/*.tsv, DIR/20newsgroups/*.jsonl.gz)."""
    source = source_of(name)
    target = directory if directory is not None else default_data_dir()
    typer.echo(f"fetching {name} from {url or source.url}", err=True)
    written = fetch_dataset(name, target, url=url, pin=None if sha256 is None else f"sha256:{sha256}")
    files = ", ".join(sorted(p.name for p in written.iterdir()))
    typer.echo(f"{name}: {files} in {written} (license: {source.license}; cite {source.cite})")
