"""Running a command's `main` in the test process, as the shell would see it: exit code and stderr."""
from __future__ import annotations

from alterrec_dist.common.cli import run_cli


def run_command(module: str, argv: list[str], capsys) -> tuple[object, str]:
    """(exit code, or the exception a traceback would show; stderr)."""
    mod = __import__(f"alterrec_dist.{module}", fromlist=["main"])
    try:
        run_cli(mod.main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001 -- a traceback is what the bad-input tests exist to catch
        code = f"{type(e).__name__}: {e}"
    return code, capsys.readouterr().err
