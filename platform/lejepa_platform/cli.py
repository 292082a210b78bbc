"""The `lejepa` command.

Each sub-command parses its arguments here and calls one function in the module that owns the
work; that function returns a JSON-ready dict. `--json` prints it as JSON on stdout, otherwise it
is rendered as YAML. Progress goes to stderr so stdout stays machine-readable; with `--json`,
whatever else writes to stdout while the command runs (MLflow's "View run" lines for a tracking
server, Ray Tune's tables, Ray's log monitor, child processes) is sent to stderr, so stdout holds
the result alone.
A `UserError` becomes one line on stderr and exit code 2, a failed run or tracking store one line
and exit code 1; anything else is a bug and keeps its traceback. Every line printed has passwords
in URIs masked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import yaml

from lejepa_platform.config import EVAL_FEATURES
from lejepa_platform.errors import RunFailed, RunStopped, TrackingError, UserError
from lejepa_platform.redact import redact_uri, redact_uris

Handler = Callable[[argparse.Namespace], dict]


def _pretrain(args: argparse.Namespace) -> dict:
    from lejepa_platform.run.launch import pretrain_from_cli

    return pretrain_from_cli(args.recipe, overrides=args.set, resume=args.resume, address=args.address,
                             quiet=args.json)


def _shards_build(args: argparse.Namespace) -> dict:
    from lejepa_platform.data.shards import build_shards

    return build_shards(args.source, args.out, rows_per_shard=args.rows_per_shard, image_format=args.format,
                        max_side=args.max_side, test_fraction=args.test_fraction, split_seed=args.split_seed,
                        quiet=args.json, address=args.address or os.environ.get("RAY_ADDRESS") or None)


def _embed(args: argparse.Namespace) -> dict:
    from lejepa_platform.run.embed import embed

    sizes = {"batch_size": args.batch_size, "rows_per_file": args.rows_per_file}
    return embed(args.target, data=args.data, out=args.out, features=args.features, gpus=args.gpus,
                 actors=args.actors, tracking_uri=args.tracking_uri, quiet=args.json,
                 address=args.address or os.environ.get("RAY_ADDRESS") or None,
                 **{k: v for k, v in sizes.items() if v is not None})


def _shards_inspect(args: argparse.Namespace) -> dict:
    from lejepa_platform.data.shards import inspect_shards

    return inspect_shards(args.dir)


def _bench(args: argparse.Namespace) -> dict:
    import importlib

    e2e_options = {"seconds": args.seconds, "repeats": args.repeats, "workload": args.workload}
    given = [f"--{name}" for name, value in e2e_options.items() if value is not None]
    if given and args.which != "e2e":
        raise UserError(f"{', '.join(given)}: only `lejepa bench e2e` takes this, not `lejepa bench {args.which}`")
    if args.compile and args.which != "step":
        raise UserError(f"--compile: only `lejepa bench step` takes this, not `lejepa bench {args.which}`")
    module = importlib.import_module(f"lejepa_platform.bench.{args.which}")
    if args.which == "step":
        return module.run(quick=args.quick, compile=args.compile)
    return module.run(quick=args.quick, **e2e_options) if args.which == "e2e" else module.run(quick=args.quick)


def _eval(args: argparse.Namespace) -> dict:
    from lejepa_platform.run.evaluate import eval_from_cli

    return eval_from_cli(args.target, data=args.data, protocols=args.protocol, tracking_uri=args.tracking_uri,
                         features=args.features)


def _sweep(args: argparse.Namespace) -> dict:
    from lejepa_platform.sweep.tune import sweep_from_cli

    return sweep_from_cli(args.recipe, overrides=args.set, resume=args.resume, address=args.address,
                          quiet=args.json)


def _analyze(args: argparse.Namespace) -> dict:
    from lejepa_platform.sweep.analysis import analyze_from_cli

    return analyze_from_cli(args.experiment, tracking_uri=args.tracking_uri, out=args.out, quiet=args.json)


def _cluster_check(args: argparse.Namespace) -> dict:
    from lejepa_platform.cluster import check_cluster_config

    return check_cluster_config(args.config, recipes=args.recipe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lejepa", description="Pretrain image encoders with LeJEPA on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        p.set_defaults(handler=handler)
        return p

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set loss.lam=0.02 (repeatable)")
        p.add_argument("--address", default=None,
                       help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)")

    p = command("pretrain", _pretrain, "run one LeJEPA pretraining (no recipe: the embedded default)")
    p.add_argument("recipe", nargs="?", default=None, help="pipelines/FILE.py or FILE.py:function")
    p.add_argument("--resume", default=None, metavar="NAME", help="continue the stopped run NAME")
    overrides(p)

    shards = sub.add_parser("shards", help="build and inspect Parquet image shards")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    p = command("build", _shards_build, "turn an image source into Parquet shards", shards_sub)
    p.add_argument("source", help="image folder, idx file, .npy/.npz, WebDataset tar(s), Parquet (shards or the "
                                  "Hugging Face Hub layout), a .csv/.jsonl list of image paths, or builtin:NAME")
    p.add_argument("out", help="output directory for the shards and manifest.json")
    p.add_argument("--rows-per-shard", type=int, default=4096)
    p.add_argument("--format", choices=("png", "jpeg", "keep"), default="keep",
                   help="re-encode images (keep: store encoded files as they are; arrays become png)")
    p.add_argument("--max-side", type=int, default=0, help="downscale so the longer side is at most PX (0: never)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="held-out share recorded as a fixed, stratified train/test split (0: none); "
                        "pretraining reads the train part, evaluation scores on the test part")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--address", default=None,
                   help="build on Ray Data on this Ray cluster (default: RAY_ADDRESS; neither: in this process; "
                        "'local': a new local cluster)")
    p = command("inspect", _shards_inspect, "rows, classes, shards and unreadable records of a shard dir", shards_sub)
    p.add_argument("dir")

    p = command("embed", _embed, "embed every image of a source with a run's frozen backbone, on Ray Data, "
                                 "into Parquet (id, label, embedding)")
    p.add_argument("target", help="MLflow run id, run directory or checkpoint directory")
    p.add_argument("--data", required=True, help="any source the platform reads (shards, folder, tars, Parquet, ...)")
    p.add_argument("--out", required=True,
                   help="directory or URI for the embeddings; an unfinished one of the same job is continued")
    p.add_argument("--features", choices=EVAL_FEATURES, default=None,
                   help="what to write (default: the run's eval.features, what `lejepa eval` reads)")
    p.add_argument("--gpus", type=int, default=0, help="up to this many actors, one GPU each (0: CPU actors)")
    p.add_argument("--actors", type=int, default=0, help="up to this many CPU actors (0: the cluster's CPUs less two)")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call (default 256)")
    p.add_argument("--rows-per-file", type=int, default=None, help="rows per Parquet file (default 4096)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)")

    p = command("bench", _bench, "benchmarks against a baseline, printed as ratios")
    p.add_argument("which", choices=("sigreg", "data", "step", "mfu", "e2e", "gpu", "shards", "embed"))
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--compile", action="store_true", help="step: train with the encoder compiled (train.compile)")
    p.add_argument("--seconds", type=float, default=None,
                   help="e2e: training time of each run (default: the embedded default's budget)")
    p.add_argument("--repeats", type=int, default=None, help="e2e: alternating platform / bare pairs (default 3)")
    p.add_argument("--workload", default=None,
                   help="e2e: default (the embedded default's settings) or paper (2 x 224 + 6 x 96 views, small ViT)")

    p = command("eval", _eval, "kNN / linear / few-shot evaluation and label-free geometry of a frozen backbone")
    p.add_argument("target", help="MLflow run id or checkpoint directory")
    p.add_argument("--data", required=True,
                   help="any source the platform reads; its manifest's train/test split, else a seeded one")
    p.add_argument("--protocol", default=None,
                   help="comma list of knn, linear, fewshot (default: knn,linear when the data has labels, "
                        "else the label-free report alone)")
    p.add_argument("--features", choices=EVAL_FEATURES, default=None,
                   help="what the probes read (default: the run's eval.features)")
    p.add_argument("--tracking-uri", default=None)

    p = command("sweep", _sweep, "run a Ray Tune sweep from a sweeps/*.py recipe")
    p.add_argument("recipe")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    overrides(p)

    p = command("analyze", _analyze, "scaling-law fits and label-free ranking of a sweep")
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", default=None, help="directory for the report and plots")

    cluster = sub.add_parser("cluster", help="cluster launcher helpers")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    p = command("check", _cluster_check, "validate a cluster.yaml offline", cluster_sub)
    p.add_argument("config", nargs="?", default="cluster.yaml")
    p.add_argument("--recipe", action="append", default=[], help="recipes whose resources must fit")
    return parser


def render(value: Any) -> str:
    """The human form of a JSON-ready result: block YAML in the result's key order, floats to 6
    significant digits, anything JSON cannot hold as its string (as `--json` does)."""
    plain = json.loads(json.dumps(value, default=str), parse_float=lambda text: float(f"{float(text):.6g}"))
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120).rstrip("\n")


PROCESS_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""Environment defaults of every `lejepa` process (a user's own values win). MLflow's HTTP client
retries a failing request for about four minutes by default; three retries fail in seconds. The
end of a run waits for a restarting server on purpose instead (track.wait_s), and training never
waits for it (tracking/outbox.py)."""


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    try:
        with _stdout_for_the_result_alone(args.json):
            result = args.handler(args)
    except UserError as err:
        return _fail(f"error: {err}", 2)
    except (RunFailed, TrackingError) as err:
        return _fail(f"{'run failed' if isinstance(err, RunFailed) else 'error'}: {err}", 1)
    except RunStopped as err:
        return _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    result = redact_uris(result)
    print(json.dumps(result, indent=2, default=str) if args.json else render(result))
    return 0


def _fail(message: str, code: int) -> int:
    print(f"lejepa: {redact_uri(message)}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _stdout_for_the_result_alone(enabled: bool) -> Iterator[None]:
    """While inside (with `enabled`), anything written to stdout goes to stderr: Python writes
    through sys.stdout, and native code and child processes through file descriptor 1. A Ray
    connection the command made is closed inside, so none of Ray's threads can print after it."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    ray_before = _ray_connected()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            try:
                yield
            finally:
                if _ray_connected() and not ray_before:  # Ray's threads print to stdout until it is shut down
                    sys.modules["ray"].shutdown()
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _ray_connected() -> bool:
    """Whether this process is connected to Ray (without importing it for commands that never do)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


if __name__ == "__main__":
    sys.exit(main())
