import pytest

from trainer.prompts import load_prompts, with_article


def test_paper_prompt_sets():
    animals = load_prompts("common_animals")
    assert len(animals) == 45 and len(set(animals)) == 45 and "hedgehog" in animals
    imagenet = load_prompts("imagenet_animals")
    assert len(imagenet) == 398 and imagenet[0] == "tench" and imagenet[-1] == "puffer"
    activities = load_prompts("animal_activities")
    assert len(activities) == 45 * 3
    assert "an ant washing the dishes" in activities and "a cat riding a bike" in activities


def test_article():
    assert with_article("owl") == "an owl" and with_article("dog") == "a dog"


def test_user_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na red fox\n\n  a blue whale  \n")
    assert load_prompts("file", path) == ["a red fox", "a blue whale"]
    with pytest.raises(ValueError, match=r"prompts\.path"):
        load_prompts("file", tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts("file", tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=r"prompts\.path"):
        load_prompts("file", None)
