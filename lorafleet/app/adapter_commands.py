"""``lorafleet predict`` and ``lorafleet merge``: using an exported adapter folder
(lorafleet/ml/portable.py does the work; torch loads only when a command runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

AdapterArg = Annotated[Path, typer.Argument(help="An adapter folder, e.g. runs/quickstart/adapter")]
BaseOpt = Annotated[
    Path | None,
    typer.Option(
        "--base",
        help="A local folder of the base model (default: the run's own: the packaged MiniLM, a rebuilt "
        "tiny model, or the folder it was trained from when it is on this machine)",
    ),
]


def predict(
    adapter: AdapterArg,
    text: Annotated[list[str] | None, typer.Option("--text", help="A text to classify (repeatable)")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="A UTF-8 file of texts, one per line ('-': stdin)")
    ] = None,
    base: BaseOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Texts per forward pass")] = 64,
) -> None:
    """Classify texts with an adapter: one JSON object per text on stdout (text, label, label_id,
    and every label's probability in scores), in input order."""
    from lorafleet.ml.portable import load_adapter
    from lorafleet.ml.portable import predict as classify

    texts = list(text or [])
    if file is not None:
        lines = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
        texts += lines.splitlines()
    if not texts:
        raise typer.BadParameter("give --text TEXT (repeatable) or --file FILE")
    loaded = load_adapter(adapter, base)
    for row in classify(loaded, texts, batch_size):
        typer.echo(json.dumps(row, ensure_ascii=False))


def merge(
    adapter: AdapterArg,
    out: Annotated[Path, typer.Argument(help="The folder to write the merged model to")],
    base: BaseOpt = None,
) -> None:
    """Fold an adapter into its base model and write a model that plain transformers loads
    (AutoModelForSequenceClassification, AutoTokenizer), its label names in config.json."""
    from lorafleet.ml.portable import merge as fold

    typer.echo(f"merged model written to {fold(adapter, out, base)}")
