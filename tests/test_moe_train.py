"""Training the MoE LM on the real corpora (tiny config) and the `tinyshield moe` commands end to end."""
import json

import pytest

from base.errors import TinyshieldError
from edge.moe.train import load, tiny_recipe, train
from tools.cli import main


@pytest.mark.slow
def test_tiny_training_learns_and_caches(shared_data, build_tmp, one_thread):
    r = train(tiny_recipe(), quiet=True)
    m = r.metrics
    assert not r.cached and m["last_loss"] < m["first_loss"] - 0.8  # from ~ln(256) = 5.5 toward byte statistics
    assert set(m["val_perplexity"]) == {"tinyshakespeare", "warpeace", "wikitext2-valid"}
    assert all(p < 150 for p in m["val_perplexity"].values())
    again = train(tiny_recipe(), quiet=True)
    assert again.cached and again.path == r.path
    model, cfg = load(r.path)
    assert cfg["kind"] == "moe" and model.cfg.experts == 4


@pytest.mark.slow
def test_cli_train_run_trace(shared_data, build_tmp, one_thread, capsys):
    assert main(["moe", "train", "--tiny"]) == 0
    model_dir = next((build_tmp / "models" / "moe-lm").iterdir())
    capsys.readouterr()
    assert main(["moe", "run", "--model", str(model_dir), "--budget", "50%", "--policy", "adapmoe",
                 "--prompt", "ROMEO:", "--tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and "tokens/s" in out and "hit rate" in out and "bytes read/token" in out
    assert main(["moe", "run", "--model", str(model_dir), "--budget", "50%", "--policy", "least-stale",
                 "--storage", "emmc", "--margin", "0.5", "--lowp", "int4", "--prompt", "ROMEO:", "--tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert "storage emmc" in out and "cache-aware margin 0.5" in out and "low-precision reads" in out
    assert main(["moe", "run", "--model", str(model_dir), "--budget", "10%", "--policy", "lru", "--storage", "sd",
                 "--margin", "1", "--lowp", "int8", "--lowp-max-weight", "1", "--prefetch", "2",
                 "--prompt", "ROMEO:", "--tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert "int8 cache (every expert from its int8 copy)" in out and "prefetch: issued" in out
    assert main(["moe", "run", "--model", str(model_dir), "--budget", "25%", "--policy", "resident", "--storage",
                 "emmc", "--prompt", "ROMEO:", "--tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert "resident:" in out and " int8 + " in out and " int4 experts" in out and "hit rate 100.0%" in out
    assert main(["moe", "run", "--model", str(model_dir), "--budget", "5%", "--policy", "resident",
                 "--prompt", "x", "--tokens", "1"]) == 2
    assert "even as int4" in capsys.readouterr().err
    assert main(["moe", "run", "--model", str(model_dir), "--storage", "floppy", "--prompt", "x"]) == 2
    assert "unknown storage profile 'floppy'" in capsys.readouterr().err
    trace_file = build_tmp / "t.json"
    assert main(["moe", "trace", "--model", str(model_dir), "--corpus", "tinyshakespeare", "--tokens", "40",
                 "--budget", "25%", "--out", str(trace_file)]) == 0
    out = capsys.readouterr().out
    t = json.loads(trace_file.read_text())
    assert t["tokens"] == 40 and len(t["trace"]) == 40 * 2 * 2
    assert "belady" in out and "lru" in out


def test_cli_errors(build_tmp, tmp_path, capsys):
    assert main(["moe", "run", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"kind": "vit", "model": {}}))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    assert main(["moe", "run", "--model", str(tmp_path / "m"), "--prompt", "x"]) == 2
    assert "not an MoE model" in capsys.readouterr().err
    with pytest.raises(TinyshieldError, match="exceeds the model context"):
        train(tiny_recipe(seq_len=1000), quiet=True)
