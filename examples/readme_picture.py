"""Draw the README's picture: the issue-12782 graph with the z1 -> z2 slice highlighted.

Run from the repository root: ``.venv/bin/python examples/readme_picture.py``. The test
suite checks that the committed picture is what this script draws.
"""

import pathlib
import runpy
import tempfile

import jax

import jaxsurgery as js

ROOT = pathlib.Path(__file__).resolve().parent.parent
PICTURE = ROOT / "docs" / "issue_12782_slice.svg"


def picture() -> str:
    demo = runpy.run_path(str(ROOT / "examples" / "issue_12782.py"))  # the demo's model
    graph = js.trace(demo["f"], *demo["make_params"](jax.random.key(0)))
    drawing = graph.draw(highlight=graph.slice("z1", "z2"), engine="builtin")
    with tempfile.TemporaryDirectory() as folder:  # as .save writes it (the id fixed)
        drawing.save(f"{folder}/picture.svg")
        return pathlib.Path(folder, "picture.svg").read_text()


if __name__ == "__main__":
    PICTURE.write_text(picture())
    print(f"wrote {PICTURE.relative_to(ROOT)}")
