import argparse
import json

import steer.cli
from steer.cli import patch as cli


def test_cli_patch_json_and_plot(tmp_path):
    ap = argparse.ArgumentParser()
    cli.add_parser(ap.add_subparsers())
    task = tmp_path / "t.jsonl"
    task.write_text("\n".join(json.dumps({"clean": c, "corrupt": x, "answer": a, "wrong": w}) for c, x, a, w in
                              [("M and Y; Y to", "M and Y; N to", "M", "Y"), ("B and Q; B to", "B and Q; K to", "Q", "B")]))
    args = ap.parse_args(["patch", "--task", str(task), "--nodes", "heads", "--method", "activation,atp,atp*",
                          "--model", "tiny-llama", "--json", str(tmp_path / "o.json"), "--plot", str(tmp_path / "p.png")])
    args.func(args)
    doc = json.loads((tmp_path / "o.json").read_text())
    assert set(doc["methods"]) == {"activation", "atp", "atp*"}
    assert len(doc["methods"]["atp"]["labels"]) == 8 and doc["methods"]["atp"]["seconds"] > 0
    assert set(doc["comparison"]["atp"]) >= {"pearson", "spearman", "topk_recovery"}
    assert (tmp_path / "p.png").stat().st_size > 0


def test_console_entry_point_exits_zero(tmp_path, capsys):
    """`steer patch` through the real entry point (its status is what the shell sees)."""
    rc = steer.cli.main(["patch", "--task", "ioi", "--n", "2", "--nodes", "resid", "--method", "activation,atp",
                         "--model", "tiny-gemma3"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "tiny-gemma3" and set(doc["methods"]) == {"activation", "atp"}
