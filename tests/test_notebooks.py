"""Every tutorial notebook runs without error (nbclient), so they cannot rot."""

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_four_tutorials():
    assert [p.name for p in NOTEBOOKS] == [
        "01_issue_12782.ipynb",
        "02_monitoring_training.ipynb",
        "03_transformer_surgery.ipynb",
        "04_activation_patching.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    assert all(c.outputs for c in nb.cells if c.cell_type == "code"), "commit it with outputs"
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    if path.stem == "04_activation_patching":  # attribution tracks real patching
        text = "".join(
            o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
        )
        correlation = float(re.search(r"and real patching: ([-0-9.]+)", text).group(1))
        assert correlation > 0.8, text
