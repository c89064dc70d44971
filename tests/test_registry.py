"""Model names: the default model, the models folder, paths, and clear errors."""

import pytest

from ember import registry


def test_names_paths_and_errors(tmp_path, monkeypatch, llama_dir):
    folder = tmp_path / "models"
    (folder / "tiny").mkdir(parents=True)
    (folder / "tiny" / "config.json").write_text("{}")
    monkeypatch.setenv("EMBER_MODELS", str(folder))
    assert registry.resolve_model("tiny") == str(folder / "tiny")
    assert registry.resolve_model(str(llama_dir)) == str(llama_dir)
    assert "tiny" in registry.list_models()
    with pytest.raises(ValueError, match="is not a directory, a .gguf file, a known model name"):
        registry.resolve_model("nope")
    monkeypatch.setattr(registry, "default_model_dir", lambda: None)
    with pytest.raises(ValueError, match="--model"):
        registry.resolve_model(None)
