"""The char LM's text and its carried state: normalization (exact), the stream sampler (disjoint,
consecutive, shard-correct), carried state equal to reading the text in one piece, a resumed run equal
to an uninterrupted one, 1 vs 2 processes under torchrun, and both val numbers in metrics/charlm.json.

Tiny synthetic text written here (no package data) except for the prepare test. About 1-2 minutes on
2 cores, most of it the torchrun test (marked slow: each process imports torch and Lightning).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Params, PipelineError, TrainerConfig, task_section
from pipeline.datasets import charlm
from pipeline.datasets.charlm import CharLMData
from pipeline.datasets.prepared import Prepared, save_prepared
from pipeline.datasets.streams import StreamBatchSampler, stream_loader
from pipeline.models.char_lm import CharLM, lr_factor

REPO = Path(__file__).resolve().parents[1]
CHARS = sorted(set("\n .:abcdefghiknrstzCEFMORT"))  # the evaluation primes need their characters
BLOCK, STREAMS = 20, 8
N_TRAIN, N_VAL = 4001, 901
EPOCHS = 3


# --- normalization ---------------------------------------------------------------------------------------


def test_normalize_changes_exactly_what_it_documents():
    raw = ("  ROMEO.\r\n    But  soft!\twhat light\t \r\n\r\n\r\n\r\n"
           "JULIET.  \nAy me!\n\n\nROMEO.\n  She speaks.\n  \n\n")
    assert charlm.normalize(raw) == "ROMEO.\nBut soft! what light\n\nJULIET.\nAy me!\n\nROMEO.\nShe speaks.\n"
    assert charlm.normalize("\n\n  \n") == ""
    unchanged = "HAMLET.\nTo be, or not to be, that is the question:\n\nOPHELIA.\nGood my lord,\n"
    assert charlm.normalize(unchanged) == unchanged
    stats = charlm.normalization_stats(raw, charlm.normalize(raw))
    assert stats["indented_lines"] == 3 and stats["blank_line_runs_collapsed"] == 3  # the trailing run too
    assert stats["space_runs_collapsed"] == 2 and stats["raw_chars"] == len(raw)


def test_prepared_text_is_normalized_and_the_manifest_says_so():
    data = charlm.build(CharLMData(max_chars=60_000), seed=0)
    chars = data.vocab["chars"]
    text = "".join(chars[i] for i in np.concatenate([data.splits["train"]["ids"], data.splits["val"]["ids"]]))
    assert len(text) == 60_000 and text == charlm.read_text(60_000)[0]
    assert "\n\n\n" not in text and "  " not in text and "\n " not in text and " \n" not in text
    assert data.stats["vocab_size"] == len(chars) and data.stats["chars"] == {"train": 54_000, "val": 6_000}
    changes = data.stats["normalization"]
    assert changes["indented_lines"] > 0 and changes["raw_chars"] > changes["normalized_chars"]


# --- the stream sampler ----------------------------------------------------------------------------------


def rows_of(sampler) -> list[list[tuple[int, int, bool]]]:
    return list(iter(sampler))


@pytest.mark.parametrize("shift", [False, True])
def test_streams_are_disjoint_consecutive_and_split_over_ranks_like_the_global_batch(shift):
    n, T, S = 1003, 10, 6
    alone = StreamBatchSampler(n, T, S, seed=3, shift=shift)
    alone.set_epoch(2)
    batches = rows_of(alone)
    L = alone.stream_length
    offset = batches[0][0][0]
    assert [r[0] for r in batches[0]] == [offset + s * L for s in range(S)]
    covered = []
    for k, batch in enumerate(batches):
        assert len(batch) == S and len({r[1] for r in batch}) == 1
        assert all(r[2] == (k == 0) for r in batch)  # `first` only where a stream starts
        for s, (start, length, _) in enumerate(batch):
            if k:  # row s continues where it stopped
                previous = batches[k - 1][s]
                assert start == previous[0] + previous[1]
            assert start + length <= n - 1  # its targets exist
            covered.extend(range(start, start + length))
    assert len(covered) == len(set(covered)) == S * L  # every window once, no overlap
    if shift:
        assert L % T == 0 and all(r[1] == T for b in batches for r in b)
        assert 0 <= offset < T
        offsets = set()
        for epoch in range(6):
            alone.set_epoch(epoch)
            offsets.add(rows_of(alone)[0][0][0])
        assert len(offsets) > 1  # the windows are cut elsewhere in other epochs
    else:
        assert offset == 0 and S * L >= n - 1 - (S - 1)  # all but fewer than S characters are predicted
    for world in (2, 3):
        shards = []
        for rank in range(world):
            sampler = StreamBatchSampler(n, T, S, rank=rank, world_size=world, seed=3, shift=shift)
            sampler.set_epoch(2)
            shards.append(rows_of(sampler))
        for k, batch in enumerate(batches):
            # rank r holds its contiguous block of the global rows: together, exactly the 1-device batch
            assert sum((shard[k] for shard in shards), []) == batch
        assert all(len(shard) == len(batches) for shard in shards)


def test_stream_batches_hold_the_text_and_refuse_a_short_one():
    ids = np.arange(300, dtype=np.int64) % 7
    batch = next(iter(stream_loader(ids, 10, 4, shift=False)))
    starts = batch["index"].tolist()
    assert starts == [0, 74, 148, 222] and batch["first"].all()
    for row, start in enumerate(starts):
        assert batch["x"][row].tolist() == ids[start : start + 10].tolist()
        assert batch["y"][row].tolist() == ids[start + 1 : start + 11].tolist()
    with pytest.raises(PipelineError) as err:
        StreamBatchSampler(100, 20, 8, shift=True)
    assert "\n" not in str(err.value) and "too short" in str(err.value)
    with pytest.raises(PipelineError, match="not divisible"):
        StreamBatchSampler(1000, 10, 6, world_size=4)


# --- carried state ---------------------------------------------------------------------------------------


def tiny_model(seed: int = 0, layers: int = 2) -> CharLM:
    torch.manual_seed(seed)
    return CharLM(vocab={"chars": CHARS}, dims={},
                  model={"hidden_size": 16, "embedding_dim": 8, "num_layers": layers, "dropout": 0.0},
                  train={"lr": 0.01, "batch_size": STREAMS})


def test_carried_state_gives_the_loss_of_the_text_read_in_one_piece():
    ids = torch.randint(len(CHARS), (1500,), generator=torch.Generator().manual_seed(1)).numpy()
    model = tiny_model().eval()
    loader = stream_loader(ids, BLOCK, 4, shift=False)
    L = loader.batch_sampler.stream_length
    with torch.no_grad():
        pieces = []  # each stream in one forward call: per-position losses (4, L)
        for s in range(4):
            logits, _ = model(torch.from_numpy(ids[s * L : (s + 1) * L])[None])
            target = torch.from_numpy(ids[s * L + 1 : (s + 1) * L + 1])
            pieces.append(torch.nn.functional.cross_entropy(logits[0], target, reduction="none"))
        whole = torch.stack(pieces)
        zero_total = 0.0
        for k, batch in enumerate(loader):  # window by window, the state carried across batches
            total, count = model.loss_terms(batch)
            window = whole[:, k * BLOCK : k * BLOCK + batch["x"].shape[1]]
            assert int(count) == window.numel()
            torch.testing.assert_close(total, window.sum(), rtol=1e-5, atol=1e-4)
            zero_total += float(model.loss_terms({"x": batch["x"], "y": batch["y"]})[0])
        assert k > 3 and abs(zero_total - float(whole.sum())) > 1e-3  # from a zero state, the loss differs
        # evaluation's number: the whole text in one pass, in blocks of 128 characters
        total, count = model.text_loss(ids, block=128)
        logits, _ = model(torch.from_numpy(ids[:-1])[None])
        one = torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(ids[1:]), reduction="sum")
        assert count == len(ids) - 1
        assert total == pytest.approx(float(one), rel=1e-5)


def test_training_carries_the_state_detached_and_restarts_it_at_a_stream_start():
    model = tiny_model(layers=1).train()
    ids = np.arange(400, dtype=np.int64) % len(CHARS)
    first, second = list(stream_loader(ids, 10, 2, shift=False))[:2]
    total, _ = model.loss_terms(first)
    h, c = model._carried["train"]
    assert not h.requires_grad and h.shape == (1, 2, 16)
    carried = model.start_state(second, "train")
    assert torch.equal(carried[0], h) and torch.equal(carried[1], c)
    restarted = model.start_state({**second, "first": torch.tensor([True, False])}, "train")
    assert torch.equal(restarted[0][:, 0], torch.zeros(1, 16)) and torch.equal(restarted[0][:, 1], h[:, 1])
    assert model.start_state({"x": second["x"]}, "train") is None  # a window without `first`: zero state


def test_learning_rate_warms_up_then_decays_to_its_floor():
    factors = [lr_factor(step, 200) for step in range(200)]
    assert factors[0] < factors[3] <= 1.0 and max(factors) == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.02) and all(a >= b for a, b in zip(factors[4:], factors[5:]))


# --- training through the train stage: resume, and 2 processes ------------------------------------------


def write_text(data_root: Path) -> Path:
    """A learnable stream: words of a small alphabet, seeded."""
    rng = np.random.default_rng(0)
    words = ["abc", "bad", "cafe", "head", "egg", "fade", "hg"]
    text = " ".join(rng.choice(words, 2000))
    text = "\n".join(text[i : i + 37] for i in range(0, len(text), 37)) + "."
    ids = np.array([CHARS.index(c) for c in text[: N_TRAIN + N_VAL]], dtype=np.int64)
    splits = {"train": {"ids": ids[:N_TRAIN]}, "val": {"ids": ids[N_TRAIN:]}, "test": {"ids": ids[N_TRAIN:]}}
    save_prepared(Prepared(splits, {"chars": CHARS}, {"package": "tests"}), data_root / "charlm")
    return data_root


def charlm_params(devices: int = 1, strategy: str = "auto", epochs: int = EPOCHS) -> Params:
    return Params(seed=5, tasks=["charlm"],
                  trainer=TrainerConfig(accelerator="cpu", devices=devices, strategy=strategy),
                  charlm=task_section("charlm", {
                      "model": {"hidden_size": 16, "embedding_dim": 8, "num_layers": 2, "dropout": 0.2},
                      "train": {"batch_size": STREAMS, "max_epochs": epochs, "lr": 0.01, "block_size": BLOCK}}))


DRIVER = """
import json, sys
from pathlib import Path
import lightning as L
sys.path.insert(0, {tests!r})
from test_charlm import charlm_params
from pipeline.train import train

class Record(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open(f"{{sys.argv[1]}}.rank{{trainer.global_rank}}", "a") as f:
            f.write(json.dumps([trainer.current_epoch, batch_idx, batch["index"].tolist(), batch["first"].tolist(),
                                float(trainer.callback_metrics["train_loss"])]) + "\\n")

devices = int(sys.argv[2])
print(train("charlm", charlm_params(devices, "ddp" if devices > 1 else "auto"), data_root=Path(sys.argv[3]),
            models_root=Path(sys.argv[4]) / "models", ckpt_root=Path(sys.argv[4]) / "checkpoints", track=False,
            callbacks=[Record()]))
"""


def read_records(path: Path, rank: int = 0) -> list[list]:
    return [json.loads(line) for line in Path(f"{path}.rank{rank}").read_text().splitlines()]


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text"))


def run_driver(tmp_path: Path, text_root: Path, name: str, devices: int) -> Path:
    """The train stage in a fresh process (torchrun for 2): own session, a timeout, OMP_NUM_THREADS=1."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(REPO / "tests")))
    launcher = ([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(devices)]
                if devices > 1 else [sys.executable])
    out = tmp_path / name
    out.mkdir()
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([*launcher, str(script), str(out / "log"), str(devices), str(text_root), str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail("the training ran past 420 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_read_disjoint_consecutive_streams_and_match_one(text_root, tmp_path):
    started = time.monotonic()
    one = read_records(run_driver(tmp_path, text_root, "one", 1) / "log")
    two_dir = run_driver(tmp_path, text_root, "two", 2)
    rank0, rank1 = read_records(two_dir / "log", 0), read_records(two_dir / "log", 1)
    per_epoch = len(one) // EPOCHS
    assert len(one) == len(rank0) == len(rank1) == EPOCHS * per_epoch and per_epoch >= 10
    for step, (a, r0, r1) in enumerate(zip(one, rank0, rank1)):
        assert a[:2] == r0[:2] == r1[:2]
        assert r0[2] + r1[2] == a[2] and r0[3] + r1[3] == a[3]  # the global batch, split into row blocks
        assert not set(r0[2]) & set(r1[2])
        assert all(f == (a[1] == 0) for f in a[3])
        if a[1]:  # consecutive on each rank: every row continues where it stopped
            for rows, before in ((r0[2], rank0[step - 1][2]), (r1[2], rank1[step - 1][2])):
                assert [s - p for s, p in zip(rows, before)] == [BLOCK] * len(rows)
        assert r0[4] == r1[4] == pytest.approx(a[4], rel=1e-4)  # the same global loss, dropout included
    assert one[0][2] != one[per_epoch][2]  # another epoch, another offset
    print(f"1 and 2 processes: {len(one)} steps in {time.monotonic() - started:.0f} s")


def test_a_resumed_run_reads_the_same_windows_and_ends_with_the_same_weights(text_root, tmp_path):
    """Checkpoints are epoch ends: a run stopped in epoch 1 resumes from epoch 0's checkpoint, restarts its
    carried state from zero at epoch 1's first batch (as the uninterrupted run does) and ends bitwise equal."""
    import lightning as L
    from safetensors.torch import load_file

    from pipeline.train import train

    class Record(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.rows.append((trainer.current_epoch, batch["index"].tolist(), float(outputs["loss"])))

    class Stopped(Exception):
        pass

    class Stop(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 5:
                raise Stopped  # as a kill mid-epoch: the last checkpoint is epoch 0's

    def run(out: Path, callbacks) -> None:
        train("charlm", charlm_params(), data_root=text_root, models_root=out / "models",
              ckpt_root=out / "checkpoints", track=False, callbacks=callbacks)

    reference, first, second = Record(), Record(), Record()
    run(tmp_path / "ref", [reference])
    with pytest.raises(Stopped):
        run(tmp_path / "cut", [Stop(), first])
    run(tmp_path / "cut", [second])
    per_epoch = len(reference.rows) // EPOCHS
    assert first.rows == reference.rows[: per_epoch + 5]
    assert second.rows == reference.rows[per_epoch:]  # epoch 1 again, from its first window, then the rest
    a = load_file(tmp_path / "ref" / "models" / "charlm" / "weights.safetensors")
    b = load_file(tmp_path / "cut" / "models" / "charlm" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- evaluation reports both numbers ---------------------------------------------------------------------


def test_metrics_report_carried_and_zero_state_loss(text_root, tmp_path):
    from pipeline.datasets.datamodule import PreparedDataModule
    from pipeline.evaluate import evaluate
    from pipeline.models.evaluation import token_loss as _token_loss
    from pipeline.models.saved import load_trained
    from pipeline.train import train

    params = charlm_params(epochs=2)
    train("charlm", params, data_root=text_root, models_root=tmp_path / "models", ckpt_root=tmp_path / "ckpt",
          track=False)
    evaluate("charlm", params, data_root=text_root, models_root=tmp_path / "models",
             metrics_root=tmp_path / "metrics", plots_root=tmp_path / "plots", samples_root=tmp_path / "samples",
             figures_root=tmp_path / "figures", track=False)
    metrics = json.loads((tmp_path / "metrics" / "charlm.json").read_text())
    model, _ = load_trained(tmp_path / "models" / "charlm")
    val = np.load(text_root / "charlm" / "val.npz")["ids"]
    total, count = model.text_loss(val)
    assert metrics["loss_one_piece"] == pytest.approx(total / count, abs=2e-6)  # the val text in one piece
    dm = PreparedDataModule(text_root / "charlm", STREAMS, params.seed, BLOCK)
    # `loss`: the val text as validation reads it (STREAMS streams, carried): the best checkpoint's val_loss
    config = json.loads((tmp_path / "models" / "charlm" / "config.json").read_text())
    assert metrics["loss"] == pytest.approx(config["best_val_loss"], rel=1e-5)
    length = dm.stream_loader("val").batch_sampler.stream_length
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(val[: STREAMS * length]).reshape(STREAMS, length))
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                  torch.from_numpy(val[1 : STREAMS * length + 1]))
    assert metrics["loss"] == pytest.approx(float(reference), abs=2e-6)
    with torch.no_grad():
        assert metrics["loss_zero_state"] == pytest.approx(_token_loss(model.eval(), dm, "val"), abs=2e-6)
    assert metrics["loss_one_piece"] <= metrics["loss"] < metrics["loss_zero_state"]  # context helps
    assert metrics["bits_per_char"] == pytest.approx(metrics["loss"] / np.log(2), abs=1e-5)


def test_a_text_too_short_for_its_streams_is_refused_before_any_side_effect(text_root, tmp_path):
    from pipeline.train import train

    params = charlm_params()
    section = params.charlm.model_copy(update={"train": params.charlm.train.model_copy(update={"block_size": 600})})
    with pytest.raises(PipelineError) as err:
        train("charlm", params.model_copy(update={"charlm": section}), data_root=text_root,
              models_root=tmp_path / "models", ckpt_root=tmp_path / "checkpoints", track=False)
    assert "\n" not in str(err.value) and "the train split" in str(err.value) and "too short" in str(err.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "models").exists()
