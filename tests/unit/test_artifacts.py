"""Atomic writes: an interrupted save leaves no half-written artifact and no earlier run lost."""

import pytest

from rlhflab.artifacts import check_out_dir, prepare_out_dir, write_json
from rlhflab.config import load_config
from rlhflab.errors import InputError
from rlhflab.models import create_causal_lm, save_pretrained_atomic
from rlhflab.world import World


class _Boom(RuntimeError):
    pass


def _tiny():
    cfg = load_config(None, ["model.d_model=16", "model.n_layers=1", "model.n_heads=2"])
    tok = World(cfg.world).tokenizer()
    return create_causal_lm(cfg.model, tok), tok


def test_interrupted_save_leaves_nothing_and_keeps_the_old_model(tmp_path, monkeypatch):
    model, tok = _tiny()
    out = tmp_path / "model"
    save_pretrained_atomic(model, tok, out)
    before = sorted(p.name for p in out.iterdir())

    def fail(*a, **k):
        raise _Boom("disk full")

    monkeypatch.setattr(tok, "save_pretrained", fail)
    with pytest.raises(_Boom):
        save_pretrained_atomic(model, tok, out)
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier model is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp directory left behind


def test_out_dir_rules(tmp_path):
    run = tmp_path / "run"
    prepare_out_dir(run, overwrite=False)
    (run / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="holds an earlier run"):
        check_out_dir(run, overwrite=False)
    prepare_out_dir(run, overwrite=True)
    assert list(run.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        check_out_dir(tmp_path / "file", overwrite=True)


def test_write_json_never_emits_non_finite_literals(tmp_path):
    write_json(tmp_path / "m.json", {"a": float("inf"), "b": [float("nan"), 1.0]})
    text = (tmp_path / "m.json").read_text()
    assert "Infinity" not in text and "NaN" not in text and '"inf"' in text
