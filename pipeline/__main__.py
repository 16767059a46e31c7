"""CLI: python -m pipeline <stage> [task] — one thin dispatch over the stage modules.

Problems the user can fix (bad params, missing data, unknown task, unreachable tracking store)
end in one line on stderr and exit code 2; stage modules are imported only when used.
"""

from __future__ import annotations

import argparse
import os
import sys

# Large tensors on transparent huge pages (read by torch at its first allocation, so set before any
# stage imports torch): on this project's CPU machine a fresh 262 MB tensor cost 63 ms with 4 KB
# pages and 8 ms reused, and LSTM training over 1,000 steps ran 1.8x faster with huge pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from pipeline.config import PARAMS_FILE, PipelineError  # noqa: E402


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help; an option whose default is None says in its own words what it means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one line on stderr, exit code 2 (help: --help)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    helpful = {"formatter_class": _Defaults}  # every option's default in --help
    ap = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0], **helpful)
    ap.add_argument("--params", default=PARAMS_FILE, help="params file")
    sub = ap.add_subparsers(dest="stage", required=True, metavar="stage")
    for stage, text in (("prepare", "build data/prepared/<task>/ from its source (a package or your files)"),
                        ("train", "train a task's model into models/<task>/"),
                        ("evaluate", "metrics/<task>.json, plot data, figures and samples from the held-out "
                         "split, then explorer/<task>.html and probes/<task>.json")):
        sub.add_parser(stage, help=text, description=text, **helpful).add_argument("task")
    text = "write a task's offline gate explorer page (and its probe numbers), or one for your own input"
    explore = sub.add_parser("explore", help=text, description=text, **helpful)
    explore.add_argument("task")
    given = explore.add_mutually_exclusive_group()
    given.add_argument("--text", default=None, help="your input: text (charlm, sentiment, translation) or notes "
                       "such as 'C5|1.0 D5|0.5' (melody) (default: none, the stage's held-out samples)")
    given.add_argument("--file", nargs="+", default=None, help="your input: files as `predict` takes them: .npy "
                       "(digits, gesture, activity), PNG/JPEG images (captions) (default: none, the stage's "
                       "held-out samples)")
    given.add_argument("--index", nargs="+", type=int, default=None, help="held-out samples by index (charlm: "
                       "a character offset into the held-out text) (default: the stage's choice)")
    explore.add_argument("--out", default=None, help="where the page goes (default: explorer/<task>.html with no "
                         "input given, else explore-<task>.html)")
    text = "data/sources/<task>.json: the hashes of a task's files and reader code (prepare's dependency)"
    sub.add_parser("sources", help=text, description=text, **helpful).add_argument("task")
    text = "register every task's model in MLflow; move 'champion' if better"
    sub.add_parser("register", help=text, description=text, **helpful)
    text = "the long-term dependency experiment: LSTM vs vanilla RNN"
    sub.add_parser("longrange", help=text, description=text, **helpful)

    from pipeline.serving_defaults import CHARLM, MAX_CHARS, MAX_NOTES, MELODY  # plain constants: a fast import

    text = "generate text from a registered char LM"
    sample = sub.add_parser("sample", help=text, description=text, **helpful)
    sample.add_argument("--model-uri", default="models:/charlm@champion", help="a registered char LM")
    sample.add_argument("--prime", default=None, help="the text to start from, known characters only (default: "
                        f"{CHARLM.prime!r} where the model knows its characters, else its text's first letter)")
    sample.add_argument("--length", type=int, default=CHARLM.length, help=f"characters to generate, 0..{MAX_CHARS}")
    sample.add_argument("--temperature", type=float, default=CHARLM.temperature,
                        help="sampling temperature >= 0; 0 = greedy")
    sample.add_argument("--top-k", type=int, default=None,
                        help="sample among the k likeliest characters only (default: no cut)")
    sample.add_argument("--seed", type=int, default=None,
                        help="random seed, 0..2**63-1: the same seed gives the same text (default: unseeded)")
    text = "run a registered model on inputs given on the command line"
    predict = sub.add_parser("predict", help=text, description=text, **helpful)
    predict.add_argument("task")
    predict.add_argument("inputs", nargs="+", help="texts (sentiment, translation), primes (charlm), seed notes such "
                         "as C5|1.0 (melody), image files such as PNG (captions), or .npy files (digits, gesture, "
                         "activity, video: a clip (T, H, W) 0..255), each holding one input or a stack of them")
    predict.add_argument("--model-uri", default=None, help="the model to use (default: models:/<task>@champion)")

    def default(field: str) -> str:
        return "(default: " + ", ".join(f"{name} {getattr(g, field) or 'no cut'}" for name, g in
                                        (("charlm", CHARLM), ("melody", MELODY))) + ")"

    predict.add_argument("--length", type=int, default=None, help="generators only: characters (charlm, "
                         f"0..{MAX_CHARS}) or notes (melody, 0..{MAX_NOTES}) to generate {default('length')}")
    predict.add_argument("--temperature", type=float, default=None,
                         help=f"generators only: sampling temperature >= 0, 0 = greedy {default('temperature')}")
    predict.add_argument("--top-k", type=int, default=None,
                         help=f"generators only: sample among the k likeliest {default('top_k')}")
    predict.add_argument("--seed", type=int, default=None,
                         help="generators only: random seed, 0..2**63-1 (default: unseeded)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from pipeline.config import load_params
        from pipeline.tracking import workspace_root

        # the default params.yaml is the workspace's, found from any folder inside the repo (as is its store)
        params = load_params(workspace_root() / PARAMS_FILE if args.params == PARAMS_FILE else args.params)
        if args.stage == "sources":
            from pipeline.sources import write_fingerprint

            print(write_fingerprint(args.task, params))
        elif args.stage == "prepare":
            from pipeline.prepare import prepare, summary

            print(summary(args.task, prepare(args.task, params)))
        elif args.stage == "train":
            from pipeline.train import train

            print(train(args.task, params))
        elif args.stage == "evaluate":
            from pipeline.evaluate import stage

            print(stage(args.task, params))
        elif args.stage == "explore":
            from pipeline.explore import explore

            print(explore(args.task, params, text=args.text, files=args.file, index=args.index, out=args.out))
        elif args.stage == "register":
            from pipeline.register import register_all

            print(register_all(params))
        elif args.stage == "longrange":
            from pipeline.longrange import run_longrange

            print(run_longrange(params))
        elif args.stage == "sample":
            from pipeline.serve import sample

            print(sample(params, args.model_uri, args.prime, args.length, args.temperature, args.top_k, args.seed))
        elif args.stage == "predict":
            from pipeline.serve import predict

            print(predict(params, args.task, args.inputs, args.model_uri, length=args.length,
                          temperature=args.temperature, top_k=args.top_k, seed=args.seed))
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
