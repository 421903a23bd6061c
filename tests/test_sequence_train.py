"""The char-transformer trained: PyTorch on the same weights and batches at 1 and n ranks, deterministic mode
bitwise at 1-4 ranks, resume at another rank count, the sharded optimizer; the sequence metrics."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import import_torch, run_distbp
from distbp.config import load_config
from distbp.datasets.dataset import Dataset
from distbp.datasets.text import text_dataset
from distbp.inference.builders import build_model
from distbp.parallel.comm import SerialComm
from distbp.parallel.sampler import GlobalBatches
from distbp.training.horizon import schedule_of
from distbp.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS, CONTEXT = 10, 16


def text_file(folder: Path) -> Path:
    """A token dataset of the first 12,000 characters of the shipped text, context 16."""
    source = folder / "excerpt.txt"
    source.write_text((ROOT / "data" / "shakespeare.txt").read_text()[:12000])
    return text_dataset(source, folder / "text.h5", CONTEXT)


def config(path, *sets):
    """The shipped char-transformer on path in float64, 10 steps of 8 rows, warm-up shortened to fit."""
    return load_config("char-transformer", [f'data.path="{path}"', 'train.dtype="float64"', "train.batch_size=8",
                                            f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_every=5",
                                            "optim.warmup_steps=3", f"optim.schedule_steps={STEPS}", *sets])


def run(cfg, comm, run_dir, resume="never") -> Trainer:
    """Train in this process; the Trainer after its run."""
    trainer = Trainer(cfg, comm, run_dir, resume)
    assert trainer.train() == 0
    return trainer


def torch_gpt(torch, p: dict, layers: int, heads: int):
    """The char-transformer in PyTorch on float64 tensors named as distbp's parameters (nanoGPT's GPT)."""
    def ln(x, name):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), p[f"{name}.W"], p[f"{name}.b"], 1e-5)

    def attention(x, name):
        n, t, d = x.shape
        q, k, v = (x @ p[f"{name}.W_qkv"] + p[f"{name}.b_qkv"]).split(d, dim=-1)
        q, k, v = (a.view(n, t, heads, d // heads).transpose(1, 2) for a in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(n, t, d) @ p[f"{name}.W_proj"] + p[f"{name}.b_proj"]

    def forward(ids):
        x = p["0.embedding.W"][ids] + p["1.position_embedding.W"]
        for i in range(2, 2 + layers):
            b = f"{i}.transformer_block.layers"
            x = x + attention(ln(x, f"{b}.0.residual.body.0.layernorm"), f"{b}.0.residual.body.1.causal_self_attention")
            h = ln(x, f"{b}.1.residual.body.0.layernorm") @ p[f"{b}.1.residual.body.1.linear.W"] \
                + p[f"{b}.1.residual.body.1.linear.b"]
            h = torch.nn.functional.gelu(h, approximate="tanh")
            x = x + h @ p[f"{b}.1.residual.body.3.linear.W"] + p[f"{b}.1.residual.body.3.linear.b"]
        return ln(x, f"{2 + layers}.layernorm") @ p["0.embedding.W"].T
    return forward


def torch_run(cfg, path) -> dict:
    """Final parameters by name after STEPS steps of the same model, batches, AdamW, clipping and LR in PyTorch."""
    torch = import_torch()
    t, o = cfg.train, cfg.optim
    with Dataset(path) as ds:
        split = ds.split("train")
        x, y = split.read(np.arange(split.n))
        model = build_model(cfg, ds)
    p = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in model.views(model.params).items()}
    blocks = sum(layer.kind == "transformer_block" for layer in model.layers)
    forward = torch_gpt(torch, p, blocks, model.layers[2].chain.layers[0].paths[0][1].layers[1].H)
    opt = torch.optim.AdamW(list(p.values()), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    lr_at = schedule_of(cfg, STEPS)
    batches = GlobalBatches(len(y), t.batch_size, t.seed, t.drop_last)
    for step in range(STEPS):
        idx = batches.indices(*divmod(step, batches.steps_per_epoch))
        opt.zero_grad()
        logits = forward(torch.tensor(x[idx]))
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y[idx]).reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), o.clip_grad_norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
    return {k: v.detach().numpy() for k, v in p.items()}


def close(ours: dict, expected: dict) -> list[str]:
    """Names of the parameters that differ from PyTorch's by more than 1e-10 (relative)."""
    return [k for k, v in expected.items() if not np.allclose(ours[k], v, rtol=1e-10, atol=1e-12)]


def test_char_transformer_matches_pytorch_over_10_steps(tmp_path):
    path = text_file(tmp_path)
    cfg = config(path)
    trainer = run(cfg, SerialComm(), tmp_path / "run")
    assert close(trainer.model.views(trainer.model.params), torch_run(cfg, path)) == []
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r and "summary" not in r]
    assert evals and all(math.isclose(r["val_perplexity"], math.exp(r["val_loss"])) for r in evals)
    assert all(0 <= r["val_accuracy"] <= 1 for r in evals)


@pytest.mark.parametrize("metric", ["val_loss", "val_perplexity", "val_accuracy"])
def test_best_metric_takes_the_sequence_metrics(tmp_path, metric):
    path = text_file(tmp_path)
    trainer = run(config(path, f'train.best_metric="{metric}"', "train.max_steps=2", "train.eval_every=1", "optim.warmup_steps=0",
                         'model.layers=[{type="embedding", dim=8}, {type="tied_output"}]'),
                  SerialComm(), tmp_path / "run")
    assert trainer.summary["best_metric"] == metric


EQUAL_RUNS = {  # settings, and whether the parameters must be bitwise equal to one rank's
    "plain": ([], False),
    "sharded": (["train.shard_optimizer=true"], False),
    "deterministic": (["train.deterministic=true", "train.micro_batch=2"], True),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", EQUAL_RUNS)
def test_world_matches_pytorch_and_one_rank_and_resumes_at_another_rank_count(case, comm, shared_tmp):
    sets, bitwise = EQUAL_RUNS[case]
    path = text_file(shared_tmp) if comm.is_root else None
    path = comm.bcast_obj(path)
    full, half = config(path, *sets), config(path, *sets, f"train.max_steps={STEPS // 2}")
    mine = Path(shared_tmp) / f"rank{comm.rank}"
    world = run(full, comm, shared_tmp / "world").model
    if case == "plain":
        assert close(world.views(world.params), torch_run(full, path)) == []
    alone = run(full, SerialComm(), mine / "alone").model.params.copy()
    run(half, comm, shared_tmp / "world-half")  # n ranks, then 1 rank
    comm.barrier()
    shutil.copytree(shared_tmp / "world-half", mine / "resumed")
    resumed = run(full, SerialComm(), mine / "resumed", resume="auto").model.params
    for name, params in (("world", world.params), ("resumed", resumed)):
        same = params.tobytes() == alone.tobytes() if bitwise else np.allclose(params, alone, rtol=1e-10, atol=1e-13)
        assert same, f"{name} differs from one rank's run"


TINY = """[model]
layers = [{ type = "embedding", dim = 16 }, { type = "position_embedding" },
          { type = "transformer_block", heads = 2, dropout = 0.1, attn_dropout = 0.1 },
          { type = "layernorm", dims = 1 }, { type = "tied_output" }]
[data]
path = "%s"
[train]
max_steps = 6
batch_size = 12
deterministic = true
micro_batch = 3
[optim]
name = "adamw"
lr = 0.003
"""


def test_deterministic_mode_is_bitwise_at_1_2_3_4_ranks(tmp_path):
    path = text_file(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY % path)
    crcs = []
    for ranks in (1, 2, 3, 4):
        r = run_distbp(["train", tmp_path / "tiny.toml", "--run-dir", tmp_path / f"r{ranks}", "--progress", "none"],
                       ranks, timeout=100)
        assert r.returncode == 0, r.stderr[-2000:]
        crcs.append(json.loads((tmp_path / f"r{ranks}" / "metrics.jsonl").read_text().splitlines()[-1])["params_crc32"])
    assert len(set(crcs)) == 1, crcs
