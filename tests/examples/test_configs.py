"""Every Hydra config group composes, and what it names can be built."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import lightning_seqpar  # noqa: F401 - registers the resolvers that trainer/auto.yaml uses

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def strategy_available() -> bool:
    try:
        from lightning_seqpar import SeqParStrategy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def composed(tmp_path):
    def get(*overrides):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose("config", overrides=[*overrides, f"output_dir={tmp_path}"])
    return get


def test_groups_present():
    assert options("trainer") == ["auto", "cpu", "gpu"]
    assert {"seqpar", "seqpar_spawn", "single"} <= set(options("strategy"))
    assert {"tiny", "llama_125m", "llama_1b"} <= set(options("model"))
    assert {"corpus", "passkey"} <= set(options("data"))
    assert options("experiment")


def test_defaults(composed):
    cfg = composed()
    assert cfg.strategy._target_ == "lightning_seqpar.SeqParStrategy"
    # This machine has no GPU: the default trainer resolves to 2 CPU processes in float32.
    assert cfg.trainer.devices == 2 and cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    assert cfg.trainer.max_steps == composed("trainer=cpu").trainer.max_steps
    assert cfg.data.seq_len >= 2048


def test_default_trainer_takes_the_gpus_when_there_are_some(composed, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    trainer = composed().trainer
    assert (trainer.accelerator, trainer.devices, trainer.precision) == ("cuda", 8, "bf16-mixed")


@pytest.mark.parametrize("name", options("model"))
def test_model_configs(composed, name):
    cfg = composed(f"model={name}", "model.net.n_layer=1")
    with torch.device("meta"):  # the 1B config would take seconds to initialise for real
        module = instantiate(cfg.model)
    assert isinstance(module, L.LightningModule) and module.config.n_layer == 1


@pytest.mark.parametrize("name", options("data"))
def test_data_configs(composed, name):
    cfg = composed(f"data={name}", "data.seq_len=512", "+data.max_train_bytes=20000" if name == "corpus" else "data.train_samples=4")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[-1] == 512


@pytest.mark.parametrize("name", options("strategy"))
def test_strategy_configs(composed, name):
    cfg = composed(f"strategy={name}", "strategy.sp_size=2" if name != "single" else "trainer.devices=1")
    if name != "single" and not strategy_available():
        pytest.skip("lightning_seqpar.SeqParStrategy not there yet")
    strategy = instantiate(cfg.strategy)
    trainer = instantiate(cfg.trainer, strategy=strategy, logger=False, enable_checkpointing=False)
    assert trainer.strategy is strategy


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_presets_compose(composed, name):
    cfg = composed(f"experiment={name}")
    assert cfg.trainer.max_steps > 0 and cfg.data._target_ and cfg.model.net


def test_cli_style_overrides(composed):
    cfg = composed("strategy.sp_size=4", "trainer.devices=4", "data.seq_len=16384", "model=llama_125m",
                   "trainer.max_steps=200", "strategy.attention=rsa")
    assert (cfg.strategy.sp_size, cfg.trainer.devices, cfg.data.seq_len, cfg.trainer.max_steps) == (4, 4, 16384, 200)
    assert cfg.model.net.d_model == 768 and cfg.strategy.attention == "rsa"
    assert composed("strategy=single").trainer.devices == 1


def test_loggers_and_callbacks_instantiate(composed, tmp_path):
    cfg = composed()
    loggers = [instantiate(c) for c in cfg.logger.values()]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert {type(x).__name__ for x in loggers} == {"CSVLogger", "TensorBoardLogger"}
    assert all(str(tmp_path) in x.save_dir for x in loggers)
    assert "ModelCheckpoint" in {type(c).__name__ for c in callbacks}
