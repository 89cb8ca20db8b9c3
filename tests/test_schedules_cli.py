"""`tinyshield plan`: profile tables, the timeline figure, and refusal of a plan over the board's budget."""
from tools.cli import main


def test_plan_prints_profile_and_plots(tmp_path, capsys):
    png = tmp_path / "mem.png"
    assert main(["plan", "bert-tiny", "--seq-len", "64", "--board", "stm32f405", "--tiles", "8,64",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "live-set peak" in out and "arena map" in out and "attention_s8" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_plan_refuses_over_budget(capsys):
    assert main(["plan", "bert-tiny", "--seq-len", "256", "--board", "stm32f405", "--schedule", "layerwise",
                 "--tiles", "16,256"]) == 2
    err = capsys.readouterr().err
    assert "error: the layerwise schedule needs" in err
    assert "softmax" in err and "stm32f405 has an arena budget of" in err


def test_plan_bad_arguments(capsys):
    assert main(["plan", "bert-tiny", "--board", "esp32"]) == 2
    assert "unknown board 'esp32'" in capsys.readouterr().err
    assert main(["plan", "bert-tiny", "--seq-len", "0"]) == 2
    assert "--seq-len must be >= 1" in capsys.readouterr().err
    assert main(["plan", "bert-tiny", "--seq-len", "16", "--tiles", "four"]) == 2
    assert "--tiles 'four'" in capsys.readouterr().err


def test_plan_recompute_prints_the_mac_overhead(capsys):
    assert main(["plan", "bert-tiny", "--seq-len", "64", "--board", "stm32f405", "--tiles", "16,64",
                 "--kv", "recompute"]) == 0
    out = capsys.readouterr().out
    assert "attention_kv_s8" in out and "K/V recomputed in attention layer(s) 0, 1" in out
    assert "more than the same tiles keeping K/V" in out
