"""Trains the tiny causal LM with the strategy named on the command line, on 2 CPU processes,
and saves the main process's parameters afterwards: `python launch_script.py NAME OUT.pt`.

For "seqpar_notebook" it first makes the session look interactive the way Jupyter does
(`sys.ps1` exists), which is what Lightning checks to allow only fork-based strategies."""

import sys

if sys.argv[1] == "seqpar_notebook":
    sys.ps1 = ">>> "

import torch  # noqa: E402
from lightning.fabric.utilities.imports import _IS_INTERACTIVE  # noqa: E402

import lightning_seqpar  # noqa: E402, F401  (registers the strategy names)
from tests.strategy.harness import quiet_trainer, snapshot  # noqa: E402
from tests.strategy.models import build  # noqa: E402


def main(name: str, out: str) -> None:
    if name == "seqpar_notebook":
        assert _IS_INTERACTIVE
        try:  # the script launcher re-runs a script: impossible in a notebook, and refused
            quiet_trainer(devices=2, strategy="seqpar")
        except Exception as err:  # noqa: BLE001
            assert "not compatible with an interactive environment" in str(err), err
        else:
            raise AssertionError("strategy='seqpar' was accepted in an interactive session")
    model = build("lm", False, 4, 8, 4)
    trainer = quiet_trainer(devices=2, strategy=name, max_epochs=1)
    trainer.fit(model)
    if trainer.global_rank == 0:
        torch.save(snapshot(model), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
