"""base.sizes: one reading of sizes for every command (binary byte units), stated in each command's --help."""
import pytest

from base.errors import TinyshieldError
from base.sizes import parse_size
from edge.moe.adapmoe import parse_budget
from tools.cli import main


def test_bytes_are_binary_and_params_decimal():
    assert parse_size("1MB") == parse_size("1MiB") == parse_size("1M") == 1_048_576
    assert parse_size("4MB") == 4 * 1_048_576 and parse_size("512KiB") == 512 * 1024 and parse_size("1000000") == 10**6
    assert parse_size("0.5 mb") == 524_288
    assert parse_size("1M", "params") == 1_000_000 and parse_size("1.17M", "params") == 1_170_000


def test_compress_and_moe_read_sizes_alike():
    for text in ("1MB", "900KB", "4MiB", "123456"):
        assert parse_budget(text, 0) == parse_size(text, "bytes")
    assert parse_budget("25%", 400) == 100


@pytest.mark.parametrize("bad", ["", "1GB", "4 megabytes", "0", "-1MB", "1MBB"])
def test_bad_sizes_are_refused_with_the_rule(bad):
    with pytest.raises(TinyshieldError, match="cannot read budget|must be positive") as e:
        parse_size(bad)
    if "cannot read" in str(e.value):
        assert "1MB = 1MiB = 1,048,576 B" in str(e.value)


@pytest.mark.parametrize("argv", [["compress", "--help"], ["moe", "run", "--help"]])
def test_help_states_the_unit_rule(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    out = " ".join(capsys.readouterr().out.split())
    assert "binary units: 1KB = " in out and "1MB = " in out and "1,048,576 B" in out
