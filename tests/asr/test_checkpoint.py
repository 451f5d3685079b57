"""Checkpoints: round trip, atomic writes (a failure while saving leaves the previous
checkpoint intact) and a clear ValueError naming the file for every kind of bad file."""
import json

import pytest
import torch

from dynenc.asr import CTCModel, ModelConfig, load_checkpoint, save_checkpoint

CONFIG = ModelConfig(vocab_size=6, num_features=16, dim=16, num_heads=2, ffn_dim=32, num_layers=2, kernel_size=3,
                     exit_depths=(1,))


def small_model(seed):
    torch.manual_seed(seed)
    return CTCModel(CONFIG)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip(tmp_path):
    model = small_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "run" / "model.pt", model, optimizer, epoch=3)
    loaded, payload = load_checkpoint(tmp_path / "run" / "model.pt")
    assert loaded.config == CONFIG and payload["epoch"] == 3 and "optimizer" in payload and "rng" in payload
    assert_same_weights(model, loaded)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.json", "model.pt"]


def test_a_config_written_before_the_depth_names_still_loads(tmp_path):
    # Configs written before the layer/depth convention name the same numbers exit_layers and
    # blank_skip_layer.
    config = ModelConfig(**{**vars(CONFIG), "blank_skip_depth": 1, "factorized_ctc": True})
    model = CTCModel(config)
    save_checkpoint(tmp_path / "model.pt", model)
    saved = json.loads((tmp_path / "model.json").read_text())
    saved["exit_layers"], saved["blank_skip_layer"] = saved.pop("exit_depths"), saved.pop("blank_skip_depth")
    (tmp_path / "model.json").write_text(json.dumps(saved))
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    assert loaded.config == config and (loaded.config.exit_depths, loaded.config.blank_skip_depth) == ((1,), 1)
    assert_same_weights(model, loaded)


def test_failure_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    first = small_model(0)
    save_checkpoint(path, first, epoch=1)
    files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def torch_save_dies_halfway(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, small_model(1), epoch=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files_before, "no temp file left, nothing replaced"
    monkeypatch.undo()
    loaded, payload = load_checkpoint(path)
    assert payload["epoch"] == 1
    assert_same_weights(first, loaded)


def _write_garbage(path):
    path.write_bytes(b"\x00not a checkpoint\xff" * 10)


def _write_without_model_key(path):
    torch.save({"weights": small_model(0).state_dict()}, path)


def _write_null_in_config(path):
    data = json.loads(path.with_suffix(".json").read_text())
    data["num_layers"] = None
    path.with_suffix(".json").write_text(json.dumps(data))


def _write_wrong_type_in_config(path):
    data = json.loads(path.with_suffix(".json").read_text())
    data["dim"] = "16"
    path.with_suffix(".json").write_text(json.dumps(data))


def _write_broken_json(path):
    path.with_suffix(".json").write_text("{\"dim\": ")


def _write_mismatched_config(path):
    data = json.loads(path.with_suffix(".json").read_text())
    data["num_layers"] = 3
    path.with_suffix(".json").write_text(json.dumps(data))


def _remove_config(path):
    path.with_suffix(".json").unlink()


@pytest.mark.parametrize("corrupt, message", [
    pytest.param(_write_garbage, r"cannot read checkpoint .*model\.pt", id="garbage-bytes"),
    pytest.param(_write_without_model_key, r"checkpoint .*model\.pt must hold a dict with a 'model' state dict, "
                 r"got \['weights'\]", id="no-model-key"),
    pytest.param(_write_null_in_config, r"model\.json.*'num_layers' must be int, got None", id="config-null"),
    pytest.param(_write_wrong_type_in_config, r"model\.json.*'dim' must be int, got '16'", id="config-wrong-type"),
    pytest.param(_write_broken_json, r"cannot read config file .*model\.json", id="config-not-json"),
    pytest.param(_remove_config, r"cannot read config file .*model\.json", id="config-missing"),
    pytest.param(_write_mismatched_config, r"checkpoint .*model\.pt does not match the model CTCModel",
                 id="state-dict-does-not-match-config"),
])
def test_bad_checkpoint_files_raise_value_errors_naming_the_file(tmp_path, corrupt, message):
    path = tmp_path / "model.pt"
    save_checkpoint(path, small_model(0))
    corrupt(path)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")


_SAVE_FOREVER = """
import sys, torch
from dynenc.asr import CTCModel, ModelConfig, save_checkpoint
model = CTCModel(ModelConfig(vocab_size=6, num_features=16, dim=64, num_heads=2, ffn_dim=256, num_layers=4))
step = 0
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    save_checkpoint(sys.argv[1], model, step=step)
    if step == 1:
        print("saved", flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2], ids=["at_once", "50ms", "200ms"])
def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path, delay):
    """SIGKILL a process that saves in a loop: last.pt always loads, weights and step agreeing."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "last.pt"
    child = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saved"
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    model, payload = load_checkpoint(path)
    values = {float(p.flatten()[0]) for p in model.parameters()}
    assert values == {float(payload["step"])}
    # A kill can leave a temp file behind; the next save removes it.
    save_checkpoint(path, model, step=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.pt"]
