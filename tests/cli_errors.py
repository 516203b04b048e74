"""A command line's argparse error, checked in-process: the main job's, the torchrun main job's
and the training script's tests."""

from __future__ import annotations

import pytest


def cli_error_line(main, argv, capsys) -> str:
    """Runs a command-line main(argv) in-process; checks that it ends as an argparse error (exit
    code 2, nothing on stdout, no traceback, the usage then exactly one `error:` line, last)
    and returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and captured.err.rstrip("\n").endswith(errors[0]), captured.err
    return errors[0]
