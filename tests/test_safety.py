"""Safety: nothing untrusted is unpickled or executed, YAML is read safely, reward plugins are imported only
when a config names them, no path from a data file escapes its dataset folder, and nothing is fetched
from the network at test time."""

from __future__ import annotations

import ast
import socket
import sys
from pathlib import Path

import pytest

from audio_rft import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "audio_rft"
SOURCES = sorted(PACKAGE.rglob("*.py"))

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all",
               "Loader", "UnsafeLoader", "FullLoader"}


def _name(node: ast.AST) -> str:
    """Dotted name of an expression like `torch.load` or `yaml.safe_load` ('' when not a plain name)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _findings() -> list[str]:
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = lambda node: f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"  # noqa: E731
        # names bound to torch / numpy / yaml, and functions imported from them by name
        aliases = {"torch": "torch", "numpy": "numpy", "np": "numpy", "yaml": "yaml"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in UNSAFE_MODULES:
                        found.append(f"{where(node)}: imports {alias.name}")
                    if alias.name in ("torch", "numpy", "yaml"):
                        aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                root = node.module.split(".")[0]
                if root in UNSAFE_MODULES:
                    found.append(f"{where(node)}: imports from {node.module}")
                for alias in node.names:
                    if root == "torch" and alias.name == "load":
                        found.append(f"{where(node)}: `from torch import load` hides the weights_only check")
                    if root == "yaml" and alias.name in UNSAFE_YAML:
                        found.append(f"{where(node)}: imports yaml.{alias.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                base = _name(node.value)
                if aliases.get(base) == "yaml" and node.attr in UNSAFE_YAML:
                    found.append(f"{where(node)}: yaml.{node.attr} (use yaml.safe_load)")
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            head, _, attr = name.rpartition(".")
            if aliases.get(head) == "torch" and attr == "load" and not _is_true(_keyword(node, "weights_only")):
                found.append(f"{where(node)}: torch.load without weights_only=True")
            if aliases.get(head) == "numpy" and attr == "load" and not (
                    _keyword(node, "allow_pickle") is None or
                    (isinstance(_keyword(node, "allow_pickle"), ast.Constant) and _keyword(node, "allow_pickle").value is False)):
                found.append(f"{where(node)}: numpy.load with allow_pickle")
            if attr == "read_pickle":
                found.append(f"{where(node)}: read_pickle")
            if _is_true(_keyword(node, "trust_remote_code")):
                found.append(f"{where(node)}: trust_remote_code=True runs code from the hub")
            if name in ("eval", "exec", "compile"):
                found.append(f"{where(node)}: {name}() on a string")
    return found


def test_sources_are_scanned():
    assert len(SOURCES) > 10 and PACKAGE / "train" / "engine.py" in SOURCES
    # the scan does see the torch.load calls that are there (resume), so an empty finding list means something
    text = (PACKAGE / "train" / "engine.py").read_text()
    assert "torch.load(" in text


def test_nothing_untrusted_is_unpickled_or_executed():
    """Every torch.load passes weights_only=True; no pickle, yaml.load, allow_pickle, trust_remote_code, eval."""
    assert _findings() == []


def test_the_scan_catches_what_it_looks_for(tmp_path, monkeypatch):
    bad = tmp_path / "audio_rft"
    bad.mkdir()
    (bad / "bad.py").write_text(
        "import pickle\nimport torch as T\nimport yaml\nimport numpy as np\n"
        "T.load('x')\nT.load('x', weights_only=False)\nyaml.load('a', Loader=yaml.Loader)\n"
        "np.load('x', allow_pickle=True)\nfrom_pretrained('m', trust_remote_code=True)\neval('1')\n"
        "T.load('x', weights_only=True)\nyaml.safe_load('a')\nnp.load('x')\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCES", [bad / "bad.py"])
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", bad)
    found = _findings()
    assert len(found) == 8, found
    for fragment in ("imports pickle", "torch.load without", "yaml.load", "yaml.Loader", "allow_pickle",
                     "trust_remote_code", "eval()"):
        assert any(fragment in f for f in found), fragment


# ---------------------------------------------------------------- YAML


EVIL_YAML = "model: m\nout: !!python/object/apply:os.system ['touch {marker}']\n"


def test_yaml_with_python_tags_is_refused(tmp_path):
    from audio_rft.config import load_config, read_yaml
    from audio_rft.train.sft import SFTConfig

    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(EVIL_YAML.format(marker=marker))
    for load in (lambda: read_yaml(config), lambda: load_config(SFTConfig, config)):
        with pytest.raises(UserError) as caught:
            load()
        assert "\n" not in str(caught.value) and str(config) in str(caught.value)
        assert "invalid YAML" in str(caught.value)
    assert not marker.exists()


def test_yaml_with_python_tags_via_cli_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from audio_rft.cli import main

    monkeypatch.delenv("AUDIO_RFT_DEBUG", raising=False)
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(EVIL_YAML.format(marker=marker))
    for command in ("sft", "grpo"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--config", str(config)])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"audio-rft {command}: error:")
    assert not marker.exists()


def test_yaml_override_values_are_read_safely(tmp_path):
    from audio_rft.config import load_config
    from audio_rft.train.grpo import GRPOConfig

    marker = tmp_path / "pwned"
    for override in (f"reward_weights=[!!python/object/apply:os.system ['touch {marker}']]", "rewards=[accuracy,"):
        with pytest.raises(UserError, match="invalid YAML value") as caught:
            load_config(GRPOConfig, None, [override])
        assert "\n" not in str(caught.value)
    assert not marker.exists()


# ---------------------------------------------------------------- reward plugins


PLUGIN = "from pathlib import Path\nPath({marker!r}).write_text('imported')\ndef bonus(completions, samples, **_):\n    return [1.0] * len(completions)\n"


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / "unrelated_reward_plugin.py").write_text(PLUGIN.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "unrelated_reward_plugin", raising=False)
    yield marker
    sys.modules.pop("unrelated_reward_plugin", None)


def test_reward_plugins_are_imported_only_when_named(plugin_on_path):
    import importlib

    import audio_rft.rewards
    from audio_rft.config import build_config
    from audio_rft.train.grpo import GRPOConfig, build_reward_fns

    importlib.reload(audio_rft.rewards)
    fns, weights = build_reward_fns(build_config(GRPOConfig, {"model": "m", "data": "d", "out": "o"}))
    assert set(fns) == {"accuracy", "format"}
    assert "unrelated_reward_plugin" not in sys.modules and not plugin_on_path.exists()
    # named in the config: imported then, and used
    config = build_config(GRPOConfig, {"rewards": ["accuracy", "unrelated_reward_plugin:bonus"]})
    fns, weights = build_reward_fns(config)
    assert plugin_on_path.exists() and fns["unrelated_reward_plugin:bonus"](["a", "b"], [None, None]) == [1.0, 1.0]


def test_unknown_reward_plugin_is_a_one_line_error(plugin_on_path):
    from audio_rft.config import build_config
    from audio_rft.train.grpo import GRPOConfig, build_reward_fns

    for name, fragment in (("no_such_module_xyz:f", "could not be loaded"),
                           ("unrelated_reward_plugin:missing", "could not be loaded"),
                           ("bogus", "unknown reward")):
        with pytest.raises(UserError, match=fragment) as caught:
            build_reward_fns(build_config(GRPOConfig, {"rewards": [name]}))
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- paths from data files


def _sample(audio: str):
    from audio_rft.data.schema import Sample

    return Sample(id="x", audio=audio, question="q?", choices=["a", "b"], answer="a", task="sound")


def test_relative_audio_paths_never_escape_the_dataset_folder(tmp_path):
    from audio_rft.data.dataset import resolve_audio

    folder = tmp_path / "data"
    (folder / "audio").mkdir(parents=True)
    (folder / "audio" / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "secret.wav").write_bytes(b"RIFF")
    (folder / "audio" / "link.wav").symlink_to(tmp_path / "secret.wav")
    assert resolve_audio(folder, _sample("audio/a.wav")) == (folder / "audio" / "a.wav").resolve()
    assert resolve_audio(folder, _sample("audio/../audio/a.wav")) == (folder / "audio" / "a.wav").resolve()
    for escaping in ("../secret.wav", "audio/../../secret.wav", "audio/link.wav", "./../data/../secret.wav"):
        with pytest.raises(UserError, match="escapes the dataset folder") as caught:
            resolve_audio(folder, _sample(escaping))
        assert "\n" not in str(caught.value)


def test_absolute_audio_paths_are_allowed_as_the_schema_says(tmp_path):
    """DESIGN.md: `audio` is a path relative to the dataset folder (never escaping it) or absolute."""
    from audio_rft.data.dataset import resolve_audio

    clip = tmp_path / "elsewhere" / "clip.wav"
    assert resolve_audio(tmp_path / "data", _sample(str(clip))) == clip


def test_training_refuses_a_data_file_whose_audio_escapes(tmp_path):
    """The reader used by SFT, GRPO and infer stops at the escaping item with a one-line error."""
    import json

    from audio_rft.data.dataset import load_dataset
    from audio_rft.rollout import load_waveforms

    folder = tmp_path / "data"
    folder.mkdir()
    record = _sample("../../etc/passwd").to_json()
    (folder / "data.jsonl").write_text(json.dumps(record) + "\n")
    samples = load_dataset(folder)
    with pytest.raises(UserError, match="escapes the dataset folder"):
        load_waveforms(folder, samples)


def test_sample_ids_cannot_name_files_outside_the_audio_folder():
    from audio_rft.data.dataset import audio_filename

    for sample_id in ("../../etc/passwd", "/abs/path", "..", ".", "a/b\\c", "x\x00y"):
        name = audio_filename(sample_id)
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert not name.startswith(".") and name.endswith(".wav")


# ---------------------------------------------------------------- no network


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails and is recorded."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    except (ImportError, AttributeError):
        pass
    return attempts


def test_tiny_preset_builds_and_loads_without_network(tmp_path, no_network):
    from audio_rft.model import build_tiny_preset, load_model

    folder = build_tiny_preset("tiny", tmp_path / "tiny")
    loaded = load_model(folder, device="cpu")
    assert type(loaded.model).__name__ == "Qwen2AudioForConditionalGeneration"
    assert no_network == []


def test_hub_model_not_in_cache_is_a_clear_error_not_a_download(tmp_path, no_network, monkeypatch):
    from audio_rft.model import load_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError) as caught:
        load_model("Qwen/Qwen2-Audio-7B-Instruct", device="cpu")
    assert "not in the Hugging Face cache" in str(caught.value) and "\n" not in str(caught.value)
    assert no_network == []
