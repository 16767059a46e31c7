"""Char LM quality per unit of time: val loss (nats/char) against training time, our CharLM (GateLSTM) and a plain
nn.LSTM char model with the same settings, trained and measured in one run.

    python -m pipeline prepare charlm          # data/prepared/charlm/ first
    python benchmarks/charlm_quality.py [--arms gate,lstm] [--points 8] [--threads 2] [-S train.max_epochs=6 ...]

Both arms train as `train@charlm` does (params.yaml's charlm section; `-S group.key=value` overrides it): truncated
BPTT over `batch_size` consecutive streams with the (h, c) state carried across windows (pipeline.datasets.streams),
Adam with CharLM's warm-up + cosine schedule (pipeline.models.char_lm.lr_factor), gradient norm clipped at
train.gradient_clip_val, the same seed. The loop is plain PyTorch for both (no Lightning), so the two differ only in
the model: `CharLM` (GateLSTM core, per-sample dropout) against Embedding -> nn.LSTM -> Dropout -> Linear. The arm
`gate-zero` (optional) is CharLM trained the way it was before carried state: shuffled windows from a zero state.

At `--points` moments (equal step counts) the training clock stops and the val text is scored: `val carried` as
training's validation reads it (batch_size streams, state carried across windows) and, at the end, `val one piece`
(CharLM.text_loss: the whole val text in one pass, as evaluation reports it) and `val zero-state` (every window of
block_size from a zero state). Times exclude evaluation: wall seconds and CPU seconds (user + sys of this process,
all threads) of training alone. The arms run one after the other, so a loaded machine slows them unevenly: compare
CPU seconds when the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `python -m pipeline` runs

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.datasets.datamodule import char_windows  # noqa: E402
from pipeline.datasets.prepared import load_split, load_vocab  # noqa: E402
from pipeline.datasets.streams import stream_loader  # noqa: E402
from pipeline.models.char_lm import CharLM, lr_factor  # noqa: E402

DATA = Path("data/prepared/charlm")


class PlainCharLM(nn.Module):
    """The reference: Embedding -> nn.LSTM -> Dropout -> Linear, with CharLM's sizes."""

    def __init__(self, vocab_size: int, model: dict):
        super().__init__()
        layers, dropout = model["num_layers"], model["dropout"]
        self.embed = nn.Embedding(vocab_size, model["embedding_dim"])
        self.lstm = nn.LSTM(model["embedding_dim"], model["hidden_size"], layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(model["hidden_size"], vocab_size))

    def forward(self, x, state=None):
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@torch.no_grad()
def stream_val(model, ids: np.ndarray, block: int, streams: int) -> float:
    """Val loss as training's validation reads it: `streams` rows, state carried across windows."""
    model.eval()
    total, count, state = 0.0, 0, None
    for batch in stream_loader(ids, block, streams):
        if state is not None:
            keep = (~batch["first"]).float()[None, :, None]
            state = (state[0] * keep, state[1] * keep)
        logits, state = model(batch["x"], state)
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="sum"))
        count += batch["y"].numel()
    model.train()
    return total / count


@torch.no_grad()
def zero_state_val(model, ids: np.ndarray, block: int) -> float:
    model.eval()
    windows = char_windows(ids, block)
    total, count = 0.0, 0
    for k in range(0, len(windows["x"]), 256):
        x, y = torch.from_numpy(windows["x"][k : k + 256]), torch.from_numpy(windows["y"][k : k + 256])
        logits, _ = model(x)
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    model.train()
    return total / count


def batches(arm: str, ids: np.ndarray, train: dict, seed: int, epoch: int):
    if arm != "gate-zero":
        loader = stream_loader(ids, train["block_size"], train["batch_size"], seed=seed, shift=True)
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        return
    windows = char_windows(ids, train["block_size"])
    order = torch.randperm(len(windows["x"]), generator=torch.Generator().manual_seed(seed + epoch)).numpy()
    for k in range(len(order) // train["batch_size"]):
        rows = order[k * train["batch_size"] : (k + 1) * train["batch_size"]]
        yield {"x": torch.from_numpy(windows["x"][rows]), "y": torch.from_numpy(windows["y"][rows])}


def run_arm(arm: str, vocab: dict, model_cfg: dict, train: dict, seed: int, ids: dict, points: int) -> list[dict]:
    torch.manual_seed(seed)
    if arm == "lstm":
        model = PlainCharLM(len(vocab["chars"]), model_cfg)
    else:
        model = CharLM(vocab=vocab, dims={}, model=model_cfg, train=train)
    opt = torch.optim.Adam(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    per_epoch = sum(1 for _ in batches(arm, ids["train"], train, seed, 0))
    total = per_epoch * train["max_epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total))
    marks = {round(total * (k + 1) / points) for k in range(points)}
    rows, step, wall, cpu = [], 0, 0.0, 0.0
    model.train()
    for epoch in range(train["max_epochs"]):
        state = None
        for batch in batches(arm, ids["train"], train, seed, epoch):
            t0, c0 = time.perf_counter(), cpu_seconds()
            if "first" in batch and state is not None:
                keep = (~batch["first"]).float()[None, :, None]
                state = (state[0] * keep, state[1] * keep)
            logits, new = model(batch["x"], state if "first" in batch else None)
            state = (new[0].detach(), new[1].detach())
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train["gradient_clip_val"]:
                nn.utils.clip_grad_norm_(model.parameters(), train["gradient_clip_val"])
            opt.step()
            sched.step()
            step += 1
            wall, cpu = wall + time.perf_counter() - t0, cpu + cpu_seconds() - c0
            if step in marks:
                val = stream_val(model, ids["val"], train["block_size"], train["batch_size"])
                row = {"arm": arm, "epoch": round(step / per_epoch, 2), "step": step, "wall_s": wall, "cpu_s": cpu,
                       "train_loss": float(loss.detach()), "val_carried": val}
                if step == total:
                    row["val_zero_state"] = zero_state_val(model, ids["val"], train["block_size"])
                    if isinstance(model, CharLM):
                        s, n = model.text_loss(ids["val"])
                        row["val_one_piece"] = s / n
                rows.append(row)
                print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    return rows


def override(section: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    group, _, name = key.partition(".")
    if group not in ("model", "train") or name not in section[group]:
        sys.exit(f"-S {assignment}: expected model.<key>=<value> or train.<key>=<value> of the charlm section")
    import yaml

    section[group][name] = yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="gate,lstm", help="comma-separated: gate, lstm, gate-zero")
    parser.add_argument("--points", type=int, default=8, help="evaluations along the training")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the pipeline uses torch's default)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="model.K=V or train.K=V")
    args = parser.parse_args()
    if not (DATA / "train.npz").exists():
        sys.exit(f"{DATA} is missing: run `python -m pipeline prepare charlm` first")
    torch.set_num_threads(args.threads)
    params = load_params()
    section = params.task("charlm").model_dump(mode="json")
    for assignment in args.overrides:
        override(section, assignment)
    vocab = load_vocab(DATA)
    ids = {s: load_split(DATA, s)["ids"] for s in ("train", "val")}
    print(f"charlm: {section['model']} {section['train']}; {args.threads} threads; torch {torch.__version__}")
    results = []
    for arm in args.arms.split(","):
        if arm not in ("gate", "lstm", "gate-zero"):
            sys.exit(f"--arms: unknown arm {arm!r} (gate, lstm, gate-zero)")
        results += run_arm(arm, vocab, section["model"], section["train"], params.seed, ids, args.points)
    names = {"gate": "CharLM (GateLSTM), carried", "lstm": "nn.LSTM, carried", "gate-zero": "CharLM, zero state"}
    print("\n| model | epochs | steps | train wall s | train CPU s | val nats/char (carried, streams) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {names[r['arm']]} | {r['epoch']:g} | {r['step']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
              f"{r['val_carried']:.4f} |")
    print("\n| model | val one piece | val carried (streams) | val zero-state | train wall s | train CPU s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "val_zero_state" in r:
            one = f"{r['val_one_piece']:.4f}" if "val_one_piece" in r else "n/a"
            print(f"| {names[r['arm']]} | {one} | {r['val_carried']:.4f} | {r['val_zero_state']:.4f} | "
                  f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} |")


if __name__ == "__main__":
    main()
