from pathlib import Path

import pytest

from fedxr.cli import main
from fedxr.config import Recipe, RecipeError, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES, "recipes/ must ship at least one recipe"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path, capsys):
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must open with a comment giving the exact command"
    assert "fedxr " in path.read_text().split("\n\n")[0] or "make demo" in path.read_text()


def test_defaults_load_without_a_file():
    r = load_recipe(None)
    assert r.federated.algorithm == "fedavg"
    assert r.data.sites >= r.federated.min_clients


def test_all_problems_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "data:\n  sitess: 3\n  image_size: 8\nfederated:\n  rounds: 0\n  algorithm: fedsgd\nmodell: {}\n"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    text = str(err.value)
    problems = err.value.problems
    assert len(problems) == 5, problems
    assert "data.sitess: unknown key; did you mean 'data.sites'?" in text
    assert "modell: unknown key; did you mean 'model'?" in text
    assert "federated.rounds" in text
    assert "federated.algorithm" in text
    assert "data.image_size" in text


def test_cross_section_checks(tmp_path):
    with pytest.raises(RecipeError, match="federated.min_clients: 4 is more than data.sites"):
        load_recipe(None, ["data.sites=2", "federated.min_clients=4"])


def test_step_cap_caps_only_the_sites_with_longer_epochs():
    from fedxr.federated.client import round_steps

    fed = load_recipe(None, ["federated.max_local_steps=32", "federated.local_epochs=1"]).federated
    assert round_steps(fed, 4017, 32) == 32     # the pediatric site: 126 batches, capped
    assert round_steps(fed, 626, 32) is None    # NIH: 20 batches, its whole epoch
    assert round_steps(fed, 1024, 32) is None   # exactly the cap: an epoch
    assert round_steps(fed, 1025, 32) == 32
    two = load_recipe(None, ["federated.max_local_steps=32", "federated.local_epochs=2"]).federated
    assert round_steps(two, 626, 32) == 32      # two epochs of NIH are 40 steps
    fixed = load_recipe(None, ["federated.local_steps=5"]).federated
    assert round_steps(fixed, 4017, 32) == 5
    assert round_steps(load_recipe(None, []).federated, 4017, 32) is None
    with pytest.raises(RecipeError, match="federated.max_local_steps: it caps whole local epochs"):
        load_recipe(None, ["federated.max_local_steps=32", "federated.local_steps=5"])
    with pytest.raises(RecipeError, match="privacy.dp: federated.max_local_steps counts batches"):
        load_recipe(None, ["federated.max_local_steps=32", "privacy.dp.epsilon=8", "distill.students=[]"])


def test_overrides_are_typed_and_applied():
    r = load_recipe(None, ["federated.rounds=7", "model.channels_last=true", "distill.students=[resnet18, tiny_cnn]"])
    assert r.federated.rounds == 7
    assert r.model.channels_last is True
    assert r.distill.students == ["resnet18", "tiny_cnn"]
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(None, ["rounds"])
    with pytest.raises(RecipeError, match="federated.roundz: unknown key"):
        load_recipe(None, ["federated.roundz=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("data: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "x.yaml")


def test_check_command(tmp_path, capsys):
    assert main(["check", str(RECIPES[0]), "federated.rounds=2"]) == 0
    out = capsys.readouterr().out
    assert "rounds: 2" in out
    assert "OK" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("federated:\n  rounds: -1\n  min_clients: 0\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "federated.rounds" in err
    assert "federated.min_clients" in err


def test_resolved_config_round_trips():
    r = load_recipe(RECIPES[0])
    import yaml

    again = Recipe.model_validate(yaml.safe_load(r.to_yaml()))
    assert again == r


def test_field_errors_do_not_hide_cross_section_and_registry_problems(capsys):
    """`fedxr check` with a bad field, a cross-section conflict and an unknown model reports all three."""
    args = ["check", str(RECIPES[0]), "federated.rounds=0", "federated.min_clients=9", "model.name=densenet12"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "federated.rounds" in err
    assert "federated.min_clients: 9 is more than data.sites" in err
    assert "model.name: unknown model 'densenet12'; did you mean 'densenet121'?" in err


def test_deprecated_key_is_accepted_with_a_warning(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("distill:\n  feature_weight: 0.0\n  alpha: 0.5\n")
    with pytest.warns(FutureWarning, match=r"distill.feature_weight is deprecated and ignored"):
        r = load_recipe(old)
    assert r.distill.alpha == 0.5
    assert "feature_weight" not in r.to_yaml()


def test_changed_copy_is_validated_and_leaves_the_original_alone():
    r = load_recipe(None)
    seeded = r.changed("seed 3", model={"seed": 3}, output={"name": "s3"})
    assert seeded.model.seed == 3
    assert seeded.layout.root.name == "s3"
    assert r.model.seed == 0
    with pytest.raises(RecipeError, match=r"(?s)\(bad\).*federated.rounds"):
        r.changed("bad", federated={"rounds": 0})


def test_preprocessing_is_resolved_from_the_recipe_and_the_registry():
    from fedxr.models.registry import GRAY_IMAGENET_MEAN, GRAY_IMAGENET_STD

    r = load_recipe(None, ["model.name=resnet18", "data.image_size=96"])
    assert r.preprocessing.size == 96  # the recipe's size, not the registry's 224
    assert (r.preprocessing.mean, r.preprocessing.std) == (GRAY_IMAGENET_MEAN, GRAY_IMAGENET_STD)
