"""examples/hf_trainer.py: transformers' Trainer trains a tiny real Emu3 with
Trainer(optimizers=(distopt.MLFOPSOAP(...), scheduler)) and gradient accumulation in one process;
ML-FOP-SOAP folds Trainer's micro-steps and the loss falls."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_example_folds_trainers_micro_steps_and_the_loss_falls(tmp_path, digits_cache):
    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "examples" / "hf_trainer.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history, counters = example.main(["--steps", "8", "--grad-accum", "4", "--out", str(tmp_path / "out"),
                                      "--cache-dir", str(digits_cache)])
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 8
    assert counters["fop_folds"] > 0, "ML-FOP-SOAP folded Trainer's micro-steps"
    assert counters["microsteps"] == 8 * 4, "every backward Trainer ran was one captured micro-step"
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
