"""What a user sees when a ``bsf`` command refuses: one line on stderr, no traceback."""

from __future__ import annotations


def one_line_error(capsys, *names) -> str:
    """The captured stderr, after checking it is one ``error: ...`` line without a traceback naming each of ``names``."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert str(name) in err, (name, err)
    return err
