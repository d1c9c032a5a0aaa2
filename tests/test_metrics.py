"""metrics.jsonl: every row says what it is, old files stay readable, a fresh start keeps the old curve."""

from __future__ import annotations

import json

from pretrain.metrics import MetricsWriter, read_metrics


def test_rows_carry_their_kind_and_old_rows_are_inferred(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True)
    w.log({"step": 10, "tokens": 4096, "loss": 5.0, "lr": 1e-3})
    w.log({"step": 10, "loss": 5.5, "perplexity": 244.7, "bits_per_byte": 2.1, "tokens": 512}, prefix="valid")
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train", "valid"]
    # a file from before `kind`: the same rows without it, plus a diagnostics row
    old = tmp_path / "old.jsonl"
    old.write_text(
        "\n".join(json.dumps({k: v for k, v in r.items() if k != "kind"}) for r in rows)
        + "\n"
        + json.dumps({"step": 10, "layer_var": [1.0, 2.0]})
        + "\n"
    )
    assert [r["tokens"] for r in read_metrics(old, "train")] == [4096]
    assert [r["tokens"] for r in read_metrics(old, "valid")] == [512]
    assert [r["kind"] for r in read_metrics(old)] == ["train", "valid", "diag"]


def test_a_fresh_start_keeps_the_earlier_curve(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True)
    w.log({"step": 1, "loss": 9.0, "lr": 1e-3})
    w.close()
    w = MetricsWriter(tmp_path, enabled=True)  # a fresh start in the same directory
    w.log({"step": 1, "loss": 8.0, "lr": 1e-3})
    w.close()
    kept = list(tmp_path.glob("metrics.jsonl.before-*"))
    assert len(kept) == 1 and read_metrics(kept[0], "train")[0]["loss"] == 9.0
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")] == [8.0]
    assert list(tmp_path.glob("tb.before-*"))
