"""convray tune: spec choices map onto valid specs, and a two-trial search publishes its best trial."""

import pytest

from convray.workers.repository import ModelRepository
from convray.workers.train import TrainConfig, load_spec
from convray.workers.tune import config_for, spec_for, tune_and_publish

CHOICE = {
    "head": "fc", "pool": "avg", "activation": "leaky_relu", "dropout": 0.25, "width": 0.5,
    "optimizer": "adamw", "max_lr": 0.01, "weight_decay": 1e-4, "label_smoothing": 0.1,
}  # fmt: skip


def test_a_choice_changes_the_head_pooling_activation_dropout_and_width_of_the_spec():
    base = load_spec(TrainConfig())
    spec = spec_for(base, CHOICE)
    convs = [b for b in spec.blocks if b.type == "conv"]
    assert [c.filters for c in convs] == [16, 16, 32]
    assert {c.activation.kind for c in convs} == {"leaky_relu"}
    assert {b.kind for b in spec.blocks if b.type == "pool"} == {"avg"}
    assert [b.rate for b in spec.blocks if b.type == "dropout"] == [0.25]
    assert spec.head.type == "fc" and spec.head.dropout == 0.25
    assert config_for(TrainConfig(), CHOICE).optimizer == "adamw"


@pytest.mark.integration
def test_a_two_trial_search_publishes_the_best_trial(ray_address, tmp_path):
    config = TrainConfig(workers=1, cpus_per_worker=0.5, epochs=2, storage_path=str(tmp_path / "runs"))
    lines = []
    out = tune_and_publish(config, 2, tmp_path / "repo", "digits", log=lines.append)
    loaded = ModelRepository(tmp_path / "repo").load("digits")
    tune = loaded.metadata.training["tune"]
    assert tune["trials"] == 2 and set(tune["best"]) >= {"head", "pool", "width", "optimizer"}
    assert loaded.metadata.spec.head.type == tune["best"]["head"]
    trial_lines = [line for line in lines if line.startswith("trial ")]
    assert len(trial_lines) == 2
    best_seen = max(float(line.split("val_accuracy ")[1].split()[0]) for line in trial_lines)
    assert loaded.metadata.metrics["history"][-1]["val_accuracy"] == pytest.approx(best_seen, abs=1e-4)
    assert (out / "training_curve.png").exists()
