"""The plateau schedule in a run: the rate falls when train.best_metric stalls, and a resume continues its state."""
import distbp
from conftest import metrics
from distbp.files import checkpoint as ckpt


def rates(run_dir) -> list[tuple[int, float]]:
    """(step, lr) of every train line of metrics.jsonl."""
    return [(r["step"], r["lr"]) for r in metrics(run_dir) if "lr" in r]


def config(epochs: int) -> dict:
    return {"train": {"epochs": epochs, "log_every": 1, "eval_every": 5, "best_metric": "val_accuracy"},
            "optim": {"lr": 0.2, "schedule": "plateau", "gamma": 0.5, "plateau_patience": 0}}


def test_plateau_lowers_the_rate_and_resumes_with_its_state(serial, tmp_path):
    distbp.train(config(4), run_dir=tmp_path / "straight", progress="none")
    straight = rates(tmp_path / "straight")
    assert straight[0][1] == 0.2 and min(lr for _, lr in straight) < 0.2  # val_loss stalled at least once
    assert all(b <= a for (_, a), (_, b) in zip(straight, straight[1:]))
    distbp.train(config(2), run_dir=tmp_path / "resumed", progress="none")
    attrs = ckpt.load(tmp_path / "resumed" / "checkpoints" / "step-00000046.h5").attrs
    assert {"plateau_lr", "plateau_best", "plateau_bad", "plateau_cooldown"} <= set(attrs)
    distbp.train(config(4), run_dir=tmp_path / "resumed", progress="none")
    assert rates(tmp_path / "resumed") == straight
