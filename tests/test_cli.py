"""Every job has --help; the console script is installed; user errors print one line and exit 2."""
import subprocess
import sys

import pytest

from tools.cli import main, parser


def jobs():
    sub = next(a for a in parser()._actions if a.dest == "command")
    return sorted(sub.choices)


def test_top_level_help_lists_every_job(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for job in jobs():
        assert job in out


@pytest.mark.parametrize("job", jobs())
def test_each_job_has_help(job, capsys):
    with pytest.raises(SystemExit) as e:
        main([job, "--help"])
    assert e.value.code == 0
    assert f"usage: tinyshield {job}" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "tools", "--help"], capture_output=True, text=True, check=True)
    assert "usage: tinyshield" in out.stdout


def test_user_error_is_one_line(capsys):
    assert main(["train", "no-such-recipe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown recipe 'no-such-recipe'") and "\n" not in err


def test_inputs_may_follow_options(monkeypatch):
    import tools.cli as cli

    seen = {}
    real = cli.parser

    def recording_parser():
        p = real()
        sub = next(a for a in p._actions if a.dest == "command")
        sub.choices["run"].set_defaults(func=lambda a: seen.update(inputs=a.inputs, int8=a.int8))
        return p

    monkeypatch.setattr(cli, "parser", recording_parser)
    assert cli.main(["run", "minilm", "a fine film", "--int8", "a dull film"]) == 0
    assert seen == {"inputs": ["a fine film", "a dull film"], "int8": True}


def test_unknown_option_is_refused():
    with pytest.raises(SystemExit) as e:
        main(["run", "minilm", "x", "--no-such-flag"])
    assert e.value.code == 2


def test_internal_errors_are_printed_apart_from_user_errors(capsys):
    from base.errors import InternalError, TinyshieldError
    from tools.cli import report

    assert report(TinyshieldError("--flash 2XB: cannot read")) == 2
    assert capsys.readouterr().err.strip() == "error: --flash 2XB: cannot read"
    assert report(InternalError("buffers 'a' and 'b' overlap")) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("internal error: buffers 'a' and 'b' overlap — this is a bug in tinyshield")
    assert "\n" not in err
