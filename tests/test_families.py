"""The per-generation tables: config.FAMILIES declares the generations, and every table keyed by family
(model class, counting rules, Hugging Face layout) covers exactly those; one that lacks a generation fails on
first use with one message naming the table to extend."""

import pytest

from nanoseek import config, generations, hf, stats
from nanoseek.config import Family, ModelConfig, get_preset

TABLES = {"generations.CLASSES": generations.CLASSES, "stats.COUNTING": stats.COUNTING, "hf.LAYOUTS": hf.LAYOUTS}


@pytest.mark.parametrize("where", TABLES)
def test_every_table_covers_every_family(where):
    assert list(TABLES[where]) == list(config.FAMILIES) == ["v3", "v32", "v4"]


def test_family_traits_follow_the_config_fields():
    v3, v32, v4 = get_preset("tiny"), get_preset("tiny-v32"), get_preset("tiny-v4")
    assert [c.family for c in (v3, v32, v4)] == ["v3", "v32", "v4"]
    assert [c.family_traits.document_segments for c in (v3, v32, v4)] == [True, False, False]
    assert [c.family_traits.indexer_kl for c in (v3, v32, v4)] == [False, True, False]
    assert [c.family_traits.mla for c in (v3, v32, v4)] == [True, True, False]
    assert v4.softmax_scale == v4.head_dim**-0.5  # V4: no YaRN temperature, whatever rope_factor says


def test_hf_model_types_map_to_their_family():
    types = {t: family for family, layout in hf.LAYOUTS.items() for t in layout.model_types}
    assert types == {"deepseek_v3": "v3", "deepseek_v2": "v3", "deepseek_v32": "v32", "deepseek_v4": "v4"}
    for name in ("tiny", "tiny-v32", "tiny-v4"):
        cfg = get_preset(name)
        assert types[hf.config_to_hf(cfg)["model_type"]] == cfg.family


@pytest.fixture
def v5(monkeypatch) -> ModelConfig:
    """A generation declared in config.FAMILIES but in no other table."""
    fam = Family(selected_by=lambda c: c.vocab_size == 500, validate=ModelConfig._validate_mla, mla=True,
                 document_segments=True, indexer_kl=False)
    monkeypatch.setattr(config, "FAMILIES", {**config.FAMILIES, "v5": fam})
    cfg = get_preset("tiny", vocab_size=500)
    assert cfg.family == "v5" and get_preset("tiny").family == "v3"
    return cfg


@pytest.mark.parametrize("where, use", [
    ("generations.CLASSES", generations.build_model),
    ("stats.COUNTING", stats.model_stats),
    ("stats.COUNTING", lambda cfg: stats.inference_flops_per_token(cfg, 128)),
    ("hf.LAYOUTS", hf.config_to_hf),
])
def test_a_family_missing_from_a_table_fails_with_one_clear_message(v5, where, use):
    with pytest.raises(ValueError) as e:
        use(v5)
    msg = str(e.value)
    assert msg.startswith(f"model family 'v5' is not registered in {where} (registered: v3, v32, v4)")
    assert "Adding a model generation" in msg and "\n" not in msg
