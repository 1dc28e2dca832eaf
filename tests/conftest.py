from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


def shared_trace(name: str) -> Path:
    """A real trace from ../shared/data/traces, or skip the test when the folder is absent."""
    path = SHARED_DATA / "traces" / name
    if not path.exists():
        pytest.skip(f"{path} not found: the real traces live in ../shared/data beside the checkout")
    return path


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `npusim ARGS` in-process; returns (exit status, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from npusim.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(command: str, args: list[str], needle: str,
                          defaults: dict[str, str] | None = None) -> None:
    """`npusim COMMAND` with `defaults` for the options `args` does not set exits 2 with one
    line on stderr that contains `needle`, and no traceback."""
    argv = [command]
    for k, v in (defaults or {}).items():
        if k not in args:
            argv += [k, v]
    rc, _, err = run_cli(*argv, *args)
    assert rc == 2, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
