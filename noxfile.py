"""Nox sessions that mirror CI and the other project checks.

    nox                  # tests, lint, docs, examples
    nox -s tests         # the test suite, exactly as `.ci/run` runs it
    nox -s bench         # benchmarks (not run by default)

Each session installs the package with the matching extra from `pyproject.toml` into
its own virtual environment under `.nox/`.
"""

from pathlib import Path

import nox


ROOT = Path(__file__).parent
PYTEST = ("python", "-m", "pytest", "-n", "2", "-q", "tests")

nox.options.sessions = ["tests", "lint", "docs", "examples"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with the command CI uses (README, `.ci/run`)."""
    session.install(".[test]")
    session.run(*PYTEST, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format checks, and pyright on the package."""
    session.install("-e", ".", "ruff>=0.6", "pyright>=1.1.380")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("pyright")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site; warnings (e.g. broken references) are errors."""
    session.install(".[docs]")
    # NO_MKDOCS_2_WARNING silences mkdocs-material's end-of-life banner.
    session.run(
        "mkdocs",
        "build",
        "--strict",
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def examples(session: nox.Session) -> None:
    """Run every script in examples/ at its small size."""
    session.install(".[examples]")
    scripts = sorted((ROOT / "examples").glob("*.py"))
    if not scripts:
        session.error("No scripts found in examples/.")
    for script in scripts:
        session.log(f"Running {script.relative_to(ROOT)}")
        session.run("python", str(script), env={"MFL_EXAMPLE_SMALL": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks side by side with SciPy, lineax and matfree.

    `benchmarks/run.py` (forward solves: iterations, error, time per iteration,
    compile time, many right-hand sides, the residual plot) rewrites its section of
    `benchmarks/RESULTS.md`; `benchmarks/gradients.py` prints the derivative costs.
    """
    session.install(".[bench]")
    session.run("python", "benchmarks/run.py", *session.posargs)
    session.run("python", "benchmarks/gradients.py")
