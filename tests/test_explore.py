"""The gate explorer: pages hold the model's traces (within 8-bit quantization), per topology; probes find the
unit that tracks a quantity when we build one that does; the stage and the CLI's input errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from explore_cases import CHARS, TEXT, cases

from pipeline import explore as ex
from pipeline.config import PipelineError, load_params
from pipeline.lstm import GateTrace
from pipeline.topologies import get_topology

CASES = cases()
KINDS = {"charlm": "text", "melody": "tokens", "sentiment": "tokens", "gesture": "series", "translation": "tokens",
         "activity": "series", "digits": "images", "parity": "images"}


def _page(name: str):
    topology, model, split = CASES[name]
    explorer = ex.explorer_for(get_topology(topology))
    arrays = explorer.default_input(model, split)
    return ex.build_page(name, topology, model, explorer, arrays), model, arrays


def _reference(model, arrays) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model's own trace of the page's input, top layer with directions side by side, and its real-step mask."""
    with torch.no_grad():
        trace: GateTrace = model.trace(ex._tensors({k: v for k, v in arrays.items() if k not in ("words", "skip")}))
    D = trace.num_directions
    top = {c: torch.cat([getattr(trace, c)[k] for k in range(len(trace.hidden) - D, len(trace.hidden))], -1)
           for c in ex.CHANNELS}
    return top, trace.mask


@pytest.mark.parametrize("name", list(CASES))
def test_page_holds_the_traces_within_quantization_error(name, tmp_path):
    page, model, arrays = _page(name)
    path = tmp_path / f"{name}.html"
    size = ex.write_page(page, path)
    assert size == path.stat().st_size
    html = path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page loads something from a network"
    assert "default-src 'none'" in html
    header, blob = ex.read_page(path)
    assert header["kind"] == KINDS[name] and header["topology"] == CASES[name][0]
    hidden = model.model_cfg.hidden_size
    directions = 2 if getattr(model.lstm, "bidirectional", False) and CASES[name][0] != "seq2seq" else 1
    assert len(header["units"]) == directions * hidden

    reference, mask = _reference(model, arrays)
    if CASES[name][0] == "one_to_one":  # the images of the gallery are the steps of one sequence
        reference, rows = {c: v[:, 0][None] for c, v in reference.items()}, [torch.ones(len(mask), dtype=torch.bool)]
    else:
        rows = list(mask)
    assert len(header["samples"]) == len(rows)
    for i, real in enumerate(rows):
        entry = header["samples"][i]
        assert entry["steps"] == len(entry["labels"]) == int(real.sum())
        for c in ex.CHANNELS:
            expected = reference[c][i][real].double().numpy()
            lo, hi = (np.array(header["ranges"][c][k], dtype=np.float64) for k in ("lo", "hi"))
            back = ex.decode(header, blob, i, c)
            assert back.shape == expected.shape
            # 8 bits over each unit's range on the page (the range itself is rounded to 4 decimals)
            assert (np.abs(back - expected) <= (hi - lo) / 510 + 1e-4).all(), c
        if "top_ids" in entry:
            ids, p = ex.decode(header, blob, i, "top_ids"), ex.decode(header, blob, i, "top_p") / 255.0
            assert ids.shape == (entry["steps"], min(ex.TOP_K, len(header["vocab"])))
            assert (ids < len(header["vocab"])).all() and (np.diff(p, axis=1) <= 1 / 255).all()
            assert (p.sum(1) <= 1 + ids.shape[1] / 255).all()
            assert len(entry["actual"]) == entry["steps"]


def test_the_char_lm_page_shows_the_text_and_its_next_characters():
    page, model, arrays = _page("charlm")
    text = "".join(page.samples[0].labels)
    assert text == model.decode(arrays["x"][0].tolist()) and text in TEXT and text.startswith("ALL.\n")
    assert page.samples[0].actual[:-1] == list(text[1:])
    with torch.no_grad():
        logits, _ = model(torch.as_tensor(arrays["x"]))
    assert (page.samples[0].top_ids[:, 0] == logits[0].argmax(-1).numpy()).all()


def test_user_text_is_shown_as_typed():
    topology, model, split = CASES["sentiment"]
    explorer = ex.explorer_for(get_topology(topology))
    arrays = explorer.user_input(model, split, "Not a GOOD film, honestly.", None, None)
    (sample,), _ = explorer.samples(model, arrays)
    assert sample.labels == ["Not", "a", "GOOD", "film", ",", "honestly", "."]
    assert sample.sub == ["", "unknown", "", "", "unknown", "unknown", ""]  # not in the tiny vocabulary
    assert sample.title.startswith("model: ")  # no true label for the user's own text


def test_charlm_probes_on_a_known_text():
    text = 'KING.\nAb "c(d)"\n\nFOOL.\n[x]y'
    probes = ex.charlm_probes(text)
    assert probes["position_in_line"].tolist() == [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0,
                                                   1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    assert "".join(c for c, q in zip(text, probes["inside_quotes"]) if q) == '"c(d)'
    assert "".join(c for c, q in zip(text, probes["inside_brackets"]) if q) == '(d[x'
    stray = ex.charlm_probes('A "b (c\n\nD] e) "f')  # a blank line closes what was open; stray closings count nothing
    assert [int(v) for v in stray["inside_quotes"]] == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert [int(v) for v in stray["inside_brackets"]] == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    speaker = "".join(c if s else "_" for c, s in zip(text, probes["speaker_name"]))
    assert speaker == "KING." + "_" * 12 + "FOOL." + "_" * 5


def test_correlator_equals_numpy_and_skips_undefined_steps():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6))
    y = x[:, 4] * -2.0 + rng.normal(scale=0.5, size=500)
    y[::7] = np.nan
    acc = ex.Correlator()
    acc.add(x[:200], {"p": y[:200]})
    acc.add(x[200:], {"p": y[200:]})
    result = acc.result()["p"]
    ok = np.isfinite(y)
    expected = [np.corrcoef(x[ok, u], y[ok])[0, 1] for u in range(6)]
    assert np.allclose(result["corr"], expected, atol=1e-9)
    best = ex.best_units(acc.result())["p"]
    assert best["unit"] == 4 and best["corr"] < -0.9 and best["steps"] == ok.sum()


def _counting_char_lm():
    """A char LM whose unit 0 counts the characters since the last newline: input, forget and output gates open,
    the forget gate shut by a newline, a candidate of tanh(0.01): c_t = 0.01 (position in line + 1)."""
    model = CASES["charlm"][1].__class__({"chars": CHARS}, {}, {"hidden_size": 6, "embedding_dim": len(CHARS)}, {})
    H, newline = 6, CHARS.index("\n")
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(len(CHARS)))
        lstm = model.lstm
        lstm.weight_hh_l0[[0, H, 2 * H, 3 * H]] = 0.0  # unit 0 ignores the other units
        lstm.weight_ih_l0[[0, H, 2 * H, 3 * H]] = 0.0
        lstm.bias_hh_l0[[0, H, 2 * H, 3 * H]] = 0.0
        lstm.bias_ih_l0[[0, H, 2 * H, 3 * H]] = torch.tensor([20.0, 20.0, 0.01, 20.0])
        lstm.weight_ih_l0[H, newline] = -40.0
    return model.eval()


def test_probe_finds_the_unit_that_counts_the_line():
    model = _counting_char_lm()
    index = {c: i for i, c in enumerate(CHARS)}
    split = {"ids": np.array([index[c] for c in TEXT], dtype=np.int64)}
    explorer = ex.explorer_for(get_topology("char_lm"))
    best = ex.probe_correlations(explorer, model, split)
    assert best["position_in_line"]["unit"] == 0 and best["position_in_line"]["corr"] > 0.99
    assert best["position_in_line"]["steps"] == len(TEXT)
    control = ex.probe_correlations(explorer, ex.untrained_like(model, seed=0), split)
    assert abs(control["position_in_line"]["corr"]) < 0.95


def _saved(tmp_path, name: str):
    """models/<name>/ and data/prepared/<name>/ of a tiny case, as train and prepare leave them."""
    from safetensors.torch import save_file

    from pipeline.tasks import get_task

    topology, model, split = CASES[name]
    folder = tmp_path / "models" / name
    folder.mkdir(parents=True)
    module = {"char_lm": "char_lm:CharLM", "many_to_one": "many_to_one:ManyToOne"}[topology]
    folder.joinpath("config.json").write_text(json.dumps({"model_class": module, "topology": topology,
                                                          "hparams": dict(model.hparams)}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "weights.safetensors")
    data = tmp_path / "data" / name
    data.mkdir(parents=True)
    for part in {"train", get_task(name).eval_split}:
        np.savez(data / f"{part}.npz", **split)
    return tmp_path / "models", tmp_path / "data"


def test_the_stage_writes_the_page_and_the_probe_numbers(tmp_path):
    models, data = _saved(tmp_path, "charlm")
    params = load_params("params.yaml")
    kw = dict(models_root=models, data_root=data, pages_root=tmp_path / "explorer", probes_root=tmp_path / "probes",
              track=False)
    said = ex.explore("charlm", params, **kw)
    header, _ = ex.read_page(tmp_path / "explorer" / "charlm.html")
    probes = json.loads((tmp_path / "probes" / "charlm.json").read_text())["probe"]
    assert set(probes) == {"position_in_line", "inside_quotes", "inside_brackets", "speaker_name"}
    assert header["about"]["probes"] == probes and "charlm.html" in said
    for v in probes.values():
        assert -1 <= v["corr"] <= 1 and -1 <= v["control_corr"] <= 1 and 0 <= v["unit"] < len(header["units"])

    out = tmp_path / "mine.html"
    ex.explore("charlm", params, text="ALL.\nSpeak.", out=out, **kw)
    header, _ = ex.read_page(out)
    assert header["samples"][0]["labels"] == list("ALL.\nSpeak.")
    for bad, message in (({"text": "Speak~"}, "not in the model's vocabulary: '~'"), ({"text": ""}, "empty"),
                         ({"index": [10**6]}, "out of range"),
                         ({"files": ["x.npy"]}, "--file is not an input this model takes; it takes --text or --index")):
        target = tmp_path / "bad.html"
        with pytest.raises(PipelineError, match=re.escape(message)):
            ex.explore("charlm", params, out=target, **bad, **kw)
        assert not target.exists()
    # an output path that is a folder: refused before any work, nothing left beside it
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(PipelineError, match="is a folder"):
        ex.explore("charlm", params, text="ALL.", out=tmp_path / "explorer", **kw)
    (tmp_path / "probes" / "charlm.json").unlink()
    (tmp_path / "probes" / "charlm.json").mkdir()
    with pytest.raises(PipelineError, match="charlm.json is a folder"):
        ex.explore("charlm", params, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not list(tmp_path.glob("**/*.tmp"))


def test_cli_takes_one_kind_of_input(capsys):
    from pipeline.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["explore", "charlm", "--text", "a", "--index", "1"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
