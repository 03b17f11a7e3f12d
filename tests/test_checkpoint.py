import json

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import CheckpointError, load, load_model, save_model


def test_save_load_roundtrip(tmp_path):
    model = Transformer(get_preset("tiny"))
    save_model(model, tmp_path / "ckpt", meta={"step": 3})
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["step"] == 3 and set(meta["checksums"]) == {"config.json", "model.safetensors"}
    back, tok = load(tmp_path / "ckpt")
    assert tok is None
    for (n, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(CheckpointError, match="no tokenizer.json"):  # what the text stages ask for
        load(tmp_path / "ckpt", require_tokenizer=True)


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    model = Transformer(get_preset("tiny"))
    save_model(model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(TypeError):
        save_model(model, tmp_path / "ckpt", meta={"bad": object()})  # not JSON-serialisable
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directories left behind


def test_shape_mismatch_is_named(tmp_path):
    save_model(Transformer(get_preset("tiny")), tmp_path / "a")
    get_preset("tiny", dim=32).save(tmp_path / "a" / "config.json")
    with pytest.raises(CheckpointError, match="config.json: damaged"):  # the checksums catch the edit first
        load_model(tmp_path / "a")
    (tmp_path / "a" / "meta.json").unlink()  # a hand-made checkpoint without checksums
    with pytest.raises(CheckpointError, match="embed.weight has shape"):
        load_model(tmp_path / "a")
