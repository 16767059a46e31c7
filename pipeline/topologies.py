"""The registry of topologies, and what a topology object answers. Stages ask a task's topology; none
branches on a topology's or a task's name.

A topology is one module of pipeline/models/ holding its LightningModule and `TOPOLOGY`, an instance of a
`Topology` subclass. Adding one: write that module, add its line to TOPOLOGIES. Modules are named, not
imported, so `prepare` (which validates params) never imports torch or Lightning.

What a topology object answers (see `Topology` for signatures):

    name, model_class                 the LightningModule class config.json names ("module:Class")
    key_metric, higher_is_better      what `register` compares; the first number in metrics/<task>.json
    eval_split                        the held-out split evaluation reports on ("test", or "val")
    settings(inputs)                  the optional model/train knobs it reads (OPTIONAL_SETTINGS); others are
                                      refused when set
    evaluate(model, dm, split, plots, samples) -> (metrics, baseline); classifiers also write
                                      plots/confusion.json (plot data) and confusion.png
    heatmap_labels(batch, vocab)      per-step labels of the first held-out sequence for the gate heat map
    input_example(info, source_example) the logged model's input example (what predict takes)
    load(pyfunc)                      prepare a loaded pyfunc (vocabulary lookups) once
    predict(pyfunc, model_input)      the pyfunc's predict: natural inputs -> a DataFrame
    verbs                             CLI verbs it supports besides `predict`: {"sample"} for text generators
    cli_input(pyfunc, inputs, options) `python -m pipeline predict`'s arguments -> predict's input
    cli_sample(...)                   `python -m pipeline sample`'s input (verbs holding "sample")
"""

from __future__ import annotations

import importlib

from pipeline.config import ConfigError

# name -> module holding TOPOLOGY (one line per topology)
TOPOLOGIES: dict[str, str] = {
    "one_to_one": "pipeline.models.one_to_one",
    "one_to_many": "pipeline.models.one_to_many",
    "many_to_one": "pipeline.models.many_to_one",
    "many_to_many": "pipeline.models.many_to_many",
    "seq2seq": "pipeline.models.seq2seq",
    "char_lm": "pipeline.models.char_lm",
}

# Model/train settings only some topologies read; each topology's `settings(inputs)` says which of these it
# reads. Setting one it does not read is an error; every other setting is read by every topology.
OPTIONAL_SETTINGS = frozenset({"model.embedding_dim", "model.attention", "model.frame_stride", "model.bidirectional",
                               "train.block_size", "train.augment_shift"})


def check_name(name: str) -> None:
    if name not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")


def get_topology(name: str) -> Topology:
    """The topology object (imports its module: torch and Lightning)."""
    check_name(name)
    return importlib.import_module(TOPOLOGIES[name]).TOPOLOGY


def load_variant(path: str, name: str) -> Topology:
    """The topology object a source declares ("module:object", its VARIANT), checked to be a `name` topology."""
    module, obj = path.split(":")
    variant = getattr(importlib.import_module(module), obj)
    base = get_topology(name)
    if not isinstance(variant, type(base)):
        raise ConfigError(f"{path} is not a {name} topology (an instance of {type(base).__name__} or a subclass)")
    return variant


def topology_of(info: dict) -> Topology:
    """The topology object of a trained model (its config.json): the source's variant where it declared one."""
    variant = info.get("variant")
    return load_variant(variant, info["topology"]) if variant else get_topology(info["topology"])


class Topology:
    """Base class of the topology objects: the defaults; each module of pipeline/models/ subclasses it."""

    name: str = ""
    model_class: type = object  # a pipeline.models.base.RecurrentModule subclass
    key_metric: str = "accuracy"
    higher_is_better: bool = True
    eval_split: str = "test"
    verbs: frozenset[str] = frozenset()
    max_generated: int | None = None  # generators: the cap on one request's length (serving_defaults)

    @property
    def model_path(self) -> str:
        """"module:Class" under pipeline.models: what config.json names to rebuild the model."""
        return f"{self.model_class.__module__.removeprefix('pipeline.models.')}:{self.model_class.__name__}"

    def settings(self, inputs: str) -> frozenset[str]:
        """The OPTIONAL_SETTINGS this topology reads, given its source's inputs ("tokens" or "features")."""
        return frozenset()

    def unused_settings(self, section, inputs: str) -> list[str]:
        """The optional knobs set in a task section (TaskParams) that this topology does not read."""
        unused = OPTIONAL_SETTINGS - self.settings(inputs)
        return [key for key in sorted(unused)
                if key.split(".")[1] in getattr(section, key.split(".")[0]).model_fields_set]

    def own_params(self, section: dict, inputs: str) -> dict:
        """A task's section as a dict ({"topology", "data", "model", "train"}) without the knobs it never reads."""
        unused = OPTIONAL_SETTINGS - self.settings(inputs)
        return {group: ({k: v for k, v in values.items() if f"{group}.{k}" not in unused}
                        if isinstance(values, dict) else values) for group, values in section.items()}

    # --- evaluation --------------------------------------------------------------------------------------

    def evaluate(self, model, dm, split: str, plots, samples) -> tuple[dict, dict]:
        raise NotImplementedError

    def heatmap_labels(self, batch: dict, vocab: dict) -> list[str] | None:
        return None

    # --- serving -----------------------------------------------------------------------------------------

    def input_example(self, info: dict, source_example):
        """The logged model's input example; by default the source's own (pipeline.sources.Source.example)."""
        if source_example is None:
            raise ConfigError(f"{info['task']}: its source gives no input example for the logged model")
        return source_example

    def load(self, pyfunc) -> None:
        """Called once when the pyfunc model loads (pyfunc.model, pyfunc.info, pyfunc.vocab are set)."""

    def predict(self, pyfunc, model_input):
        raise NotImplementedError

    def cli_input(self, pyfunc, inputs: list[str], options: dict):
        """`predict`'s command-line arguments as the model's input; options (sampling) only for generators."""
        raise NotImplementedError

    def cli_sample(self, pyfunc, prime: str, options: dict):
        raise NotImplementedError
