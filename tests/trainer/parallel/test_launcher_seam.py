"""The launcher seam's own refusals: what cannot start is one line, exit 2, before anything is written."""

import importlib.util

from trainer import cli
from trainer.convert.__main__ import main as convert
from trainer.equivalence import run as equivalence
from trainer.prepare.run import main as prepare


def _without_ray(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))


def test_the_ray_launcher_without_ray_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    _without_ray(monkeypatch)
    assert cli.main(["tiny-qwen2.5", "--launcher", "ray", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the ray package is not installed; install the ray extra" in err
    assert not (tmp_path / "run").exists()
    assert equivalence.main(["tp-equivalence", "--launcher", "ray", "--out", str(tmp_path / "gates")]) == 2
    assert "the ray package is not installed" in capsys.readouterr().err and not (tmp_path / "gates").exists()
    assert convert(["hf-to-mcore", str(tmp_path), str(tmp_path / "mcore"), "--layout", "tp2", "--launcher", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the ray package is not installed" in err and not (tmp_path / "mcore").exists()
    assert prepare(["tiny-qwen2.5", "--launcher", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: prepare tiny-qwen2.5: launcher ray: the ray package is not installed" in err
