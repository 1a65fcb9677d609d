"""Every script in `examples/` runs to completion at its reduced size.

Each example checks its own results and exits with a non-zero status when they are
wrong, so a zero exit status here is an assertion about the numbers, not only that the
script did not crash. `MFL_EXAMPLE_SMALL=1` selects the reduced size and
`MFL_EXAMPLE_OUTDIR` redirects figures to a temporary directory.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def test_examples_exist():
    assert any(p.name == "quickstart.py" for p in EXAMPLES)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path):
    env = dict(os.environ, MFL_EXAMPLE_SMALL="1", MFL_EXAMPLE_OUTDIR=str(tmp_path))
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"{script.name} exited with {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
