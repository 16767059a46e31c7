"""The gate explorer in a real browser: headless Chromium opens each topology's page from file:// with no
network; the page renders every step, a scripted hover and a range selection update the view, the console
stays clean and the page asks for nothing. Skipped where Chromium is missing, except in CI (CI=true), where
.ci/run installs it and a missing browser fails."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from browser import chromium, exercise, missing
from explore_cases import cases

from pipeline import explore as ex
from pipeline.topologies import get_topology

WHY = missing()
if WHY and os.environ.get("CI", "").lower() == "true":
    raise RuntimeError(f"CI must run the browser test: {WHY}")
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    written = {}
    for name, (topology, model, split) in cases().items():
        explorer = ex.explorer_for(get_topology(topology))
        page = ex.build_page(name, topology, model, explorer, explorer.default_input(model, split))
        ex.write_page(page, folder / f"{name}.html")
        written[name] = folder / f"{name}.html"
    return written


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


@pytest.mark.parametrize("name", ["charlm", "melody", "sentiment", "gesture", "translation", "activity", "digits",
                                  "parity"])
def test_page_renders_and_answers_hover_and_selection(name, pages, browser):
    seen = exercise(browser, pages[name], hover_step=1, select=(0, 2), fragment="unit=1")
    assert seen["ready"], f"the page did not start: {seen.get('console')}"
    assert seen["steps"] == seen["header_steps"] > 2
    assert seen["hover_before"].startswith("0 of") and seen["hover_after"].startswith("1 of")
    # the page's JavaScript decodes what Python wrote: the hovered step's five values for unit 1, to 3 decimals
    header, blob = ex.read_page(pages[name])
    shown = [float(v) for v in re.findall(r"(-?\d+\.\d{3})", seen["hover_gates"])]
    expected = [ex.decode(header, blob, 0, c)[1, 1] for c in ex.CHANNELS]
    assert len(shown) == 5 and np.allclose(shown, expected, atol=0.0005 + 1e-6), (shown, expected)
    if name in ("charlm", "melody", "translation", "activity", "digits", "parity"):  # models that predict at every step
        assert re.search(r"top", seen["hover_top"]) and re.search(r"0\.\d{3}", seen["hover_top"])
    assert seen["selection"].startswith("steps 0–2 (3)")
    assert seen["sort"] == "match" and seen["selected_steps"] == 3
    match = [float(v) for v in seen["match_column"]]
    assert match and match == sorted(match, reverse=True)  # ranked by match to the selection
    assert re.search(r"\d+ runs", seen["fires"])
    assert seen["unit"] == 1  # the #unit=1 in the link chose the unit
    errors = [e for e in seen["console"] if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    assert seen["resources"] == 0
    assert pages[name].resolve().as_uri() in seen["requests"]  # the log sees the page itself...
    assert all(url.startswith(("file:", "data:", "blob:")) for url in seen["requests"]), seen["requests"]  # only
