"""The `edgecam` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from edgecam import __version__
from edgecam.core.errors import EdgecamError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        help="model name from the manifest, or a .tflite path (default: the manifest's default)",
    )
    p.add_argument("--labels", help="labels file, one label a line (default: the model's own from the manifest)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="interpreter threads (default: $EDGECAM_THREADS, else 2)",
    )
    p.add_argument("--feature-tensor", help="name of the feature-map tensor, when the head search fails")
    p.add_argument("--weights-tensor", help="name of the classifier weights tensor (with --feature-tensor)")
    p.add_argument("--bias-tensor", help="name of the classifier bias tensor (optional)")
    p.add_argument("--input-mean", metavar="M[,M,M]",
                   help="input normalisation, in pixel units 0..255: the model sees (pixel - mean) / std; one "
                   "value or one per channel (default: the manifest's, else the model's metadata, else raw "
                   "pixels for quantized inputs and 127.5 for float ones)")
    p.add_argument("--input-std", metavar="S[,S,S]", help="input normalisation's std, with --input-mean")


def _add_pixel_limit(p: argparse.ArgumentParser) -> None:
    from edgecam.core.images import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images whose header claims more pixels, before decoding them "
                   f"(default {DEFAULT_MAX_PIXELS:,})")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _method_help(which: list[str]) -> str:
    from edgecam.core.methods.registry import REGISTRY

    return "; ".join(f"{n}: {REGISTRY[n].summary}" for n in which)


def _add_method_args(p: argparse.ArgumentParser) -> None:
    """The explanation methods' options; each method takes those it knows (its fields, core/methods),
    and one given to a method that does not take it is refused (core.methods.check_options)."""
    from edgecam.core.methods.registry import names

    g = p.add_argument_group("method options", "each applies to the methods it names; given with another "
                             "method it is refused")
    # No argparse defaults: None is "not given", so the method's own default applies and a
    # given option can be told from a default one.
    options = [
        g.add_argument("--patch", type=int, help="occlusion: patch side, in model input pixels (default 56)"),
        g.add_argument("--stride", type=int, help="occlusion: stride, in model input pixels (default 28)"),
        g.add_argument("--seed", type=int,
                       help="seed of the random methods (lime, rise, random; in evaluate also the tie-breaking) "
                       "(default 0); the same seed gives the same maps"),
        g.add_argument("--samples", type=int,
                       help="lime: on/off samples (default 500); rise: random masks (default 1000); one inference "
                       "each"),
        g.add_argument("--segments", type=int, help="lime: superpixels (SLIC) to switch on and off (default 50)"),
        g.add_argument("--cells", type=int, help="rise: cells on each side of a mask's coarse grid (default 7)"),
        g.add_argument("--stage", help="scorecam: 'last' (default), a stage's number as `edgecam layers` lists "
                       "them (1 = nearest the input), or a tensor name"),
        g.add_argument("--channels", type=int,
                       help="scorecam: the K most active channels of the stage to use (default 128): K inferences"),
    ]
    p.set_defaults(method_options=tuple(a.dest for a in options))
    g.add_argument("--workers", type=int,
                   help="interpreters running the inferences side by side, one thread each (default: one per "
                   f"core); explain refuses it with a method that runs no more ({', '.join(names(('frame',)))})")


def _explain_args(ex: argparse.ArgumentParser) -> None:
    from edgecam.core.methods.registry import names

    _add_model_args(ex)
    ex.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    _add_pixel_limit(ex)
    ex.add_argument("--top", "-k", type=int, default=3, help="how many labels to report (default 3)")
    ex.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        metavar="NAME_OR_ID",
        help="also explain this class, with the same method (repeatable)",
    )
    ex.add_argument("--out", "-o", type=Path, help="write overlay images into this directory")
    ex.add_argument("--style", choices=("blend", "dim", "both"), default="both", help="overlay style (default both)")
    ex.add_argument("--format", choices=("jpg", "png"), default="jpg", help="overlay file format (default jpg)")
    ex.add_argument(
        "--crop", action="store_true", help="centre-crop to the model's aspect instead of resizing the whole frame"
    )
    ex.add_argument(
        "--exact-resize",
        action="store_true",
        help="plain INTER_AREA downscaling always (default: INTER_AREA for inputs under 160 px and frames "
        "under 3x the input, where the fast path would move answers; the fast path elsewhere)",
    )
    ex.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    ex.add_argument("--method", choices=names(), default="cam", metavar="METHOD",
                    help=f"how to explain (default cam): {_method_help(names())}")
    ex.add_argument("--wide", action="store_true", help="the same as --method wide")
    _add_method_args(ex)


def _evaluate_args(ev: argparse.ArgumentParser) -> None:
    from edgecam.core.evaluate import DEFAULT_METHODS
    from edgecam.core.methods.registry import names

    _add_model_args(ev)
    ev.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    ev.add_argument("--method", action="append", choices=names(square_input=True), metavar="METHOD",
                    help="repeatable (default: " + ", ".join(DEFAULT_METHODS) + "; random is the baseline): "
                    + _method_help(names(square_input=True)))
    _add_pixel_limit(ev)
    ev.add_argument("--masks", type=Path, help="directory of object masks named like the images (white = object)")
    ev.add_argument("--steps", type=int, default=16, help="points on each curve after the start (default 16)")
    _add_method_args(ev)
    ev.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _layers_args(la: argparse.ArgumentParser) -> None:
    _add_model_args(la)
    la.add_argument("image", type=Path, metavar="IMAGE")
    _add_pixel_limit(la)
    la.add_argument("--out", "-o", type=Path, default=Path("."), help="directory for IMAGE.layers.jpg (default .)")
    la.add_argument("--json", action="store_true", help="the stages as JSON on stdout")
    la.add_argument("--class", dest="cls", metavar="NAME_OR_ID",
                    help="also draw this class's Score-CAM at every stage, beside the activations")
    la.add_argument("--channels", type=int,
                    help="with --class: the K most active channels of each stage to use (default 128)")
    la.add_argument("--workers", type=int, help="with --class: interpreters side by side (default: one per core)")


def _inspect_args(ins: argparse.ArgumentParser) -> None:
    _add_model_args(ins)
    ins.add_argument("model_arg", nargs="?", metavar="MODEL", help="model name or path (same as --model)")
    ins.add_argument("--json", action="store_true")


def _models_args(models: argparse.ArgumentParser) -> None:
    models.set_defaults(print_usage=models.print_help)
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    msub.add_parser("list", help="models in the manifest and whether they are cached")
    fe = msub.add_parser("fetch", help="download models into the cache, checking sha256")
    fe.add_argument("names", nargs="*", metavar="NAME", help="model names (default: the default model)")
    fe.add_argument("--all", action="store_true", help="every model in the manifest")
    fe.add_argument("--mirror", help="a directory or URL holding the files by name (env EDGECAM_MODEL_MIRROR)")
    pr = msub.add_parser("prepare", help="write a copy of a model whose outputs include the CAM feature map")
    pr.add_argument("input", type=Path, metavar="IN")
    pr.add_argument("output", type=Path, metavar="OUT")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    """The config file, and the settings that have flags; they win over the file and the environment."""
    from edgecam.device.config import add_flags

    p.add_argument(
        "--config", "-c", type=Path, help="TOML config (default: $EDGECAM_CONFIG, else /etc/edgecam/edgecam.toml)"
    )
    add_flags(p)


def _run_args(run: argparse.ArgumentParser) -> None:
    _add_overrides(run)
    run.add_argument("--max-frames", type=int, default=0, metavar="N", help="stop cleanly after N frames")
    run.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _config_args(cfg: argparse.ArgumentParser) -> None:
    cfg.set_defaults(print_usage=cfg.print_help)
    csub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    check = csub.add_parser("check", help="validate and print the effective configuration, secrets redacted")
    _add_overrides(check)
    csub.add_parser("default", help="print a commented default config file")
    csub.add_parser("reference", help="print docs/configuration.md, made from the settings' declarations")


def _dashboard_args(db: argparse.ArgumentParser) -> None:
    from edgecam.broker import add_broker_flags

    add_broker_flags(db, "broker user name; with one, the page can send commands")
    db.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                    help="where the page is served (default 127.0.0.1:8080, this machine only)")
    db.add_argument("--token", help="require ?token=... on every request (visible in ps: prefer --token-file "
                    "or $EDGECAM_DASHBOARD_TOKEN)")
    db.add_argument("--token-file", metavar="FILE", help="file holding the token (one line)")
    db.add_argument("--allow-host", action="append", metavar="NAME",
                    help="a host name the page may be opened by, besides loopback names and addresses "
                    "(e.g. the name behind a reverse proxy); repeatable")
    db.add_argument("--prefix", default="edgecam", help="topic prefix (default edgecam)")
    db.add_argument("--stale-after", type=float, default=30.0, metavar="S",
                    help="a device with no result for this long is shown stale (default 30)")
    db.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _watch_args(w: argparse.ArgumentParser) -> None:
    from edgecam.broker import add_broker_flags
    from edgecam.cli.watch import EXIT_STATUSES

    w.epilog, w.formatter_class = EXIT_STATUSES, argparse.RawDescriptionHelpFormatter
    add_broker_flags(w)
    w.add_argument("--prefix", default="edgecam", help="topic prefix (default edgecam)")
    w.add_argument("--device", "-d", help="only this device (default: all)")
    w.add_argument("--heatmap", action="store_true", help="draw each decoded CAM as text shades")
    w.add_argument("--count", "-n", type=int, default=0, help="exit after N results")
    w.add_argument("--timeout", type=float, default=0,
                   help="stop after this many seconds (0: no limit); see the exit status below")


# Each command: its help line, and what adds its arguments (importing what they need: the method
# registry, the settings, the broker flags).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "explain": ("classify image files and explain them with CAMs, offline", _explain_args),
    "evaluate": ("how faithful is a map: deletion, insertion, pointing game (offline)", _evaluate_args),
    "layers": ("each stage's channel-mean activation over the frame, in one picture", _layers_args),
    "inspect": ("show a model's input, CAM head and runtime", _inspect_args),
    "models": ("list, fetch and prepare models", _models_args),
    "run": ("the daemon: capture, classify, explain, publish over MQTT", _run_args),
    "config": ("check the configuration, or print a commented default", _config_args),
    "dashboard": ("a live web page for a fleet of devices, fed from the broker", _dashboard_args),
    "watch": ("print results from the broker as readable lines", _watch_args),
}


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The command line; with `commands`, only their arguments are added (every command is there by
    name and help): a command imports what its own flags need and no more, so `edgecam watch` never
    loads OpenCV or the interpreter runtime, and `edgecam --version` no OpenCV. None: all of them."""
    parser = argparse.ArgumentParser(
        prog="edgecam",
        description="Classify camera frames with a quantized TFLite model and explain each prediction "
        "with a class activation map.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and the TFLite runtime in use")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        if commands is None or name in commands:
            add_args(p)
    return parser


def command_of(argv: Sequence[str]) -> list[str]:
    """The command a command line names: its first word that is not an option (no option of the top
    level takes a value). None of ours: argparse says what is wrong with it, and needs no arguments."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return [word] if word in COMMANDS else []


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    try:
        if args.version:
            return _version()
        if args.command == "explain":
            from edgecam.cli.explain import run_explain

            return run_explain(args)
        if args.command == "layers":
            from edgecam.cli.layers import run_layers

            return run_layers(args)
        if args.command == "evaluate":
            from edgecam.cli.evaluate import run_evaluate

            return run_evaluate(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "models":
            return _models(args)
        if args.command == "run":
            from edgecam.device.run import run_daemon

            return run_daemon(args)
        if args.command == "config":
            return _config(args)
        if args.command == "dashboard":
            from edgecam.device.run import setup_logging
            from edgecam.web.dashboard import run_dashboard

            setup_logging(args.verbose)
            return run_dashboard(args)
        if args.command == "watch":
            from edgecam.cli.watch import run_watch

            return run_watch(args)
        parser.print_help(sys.stderr)
        return 2
    except EdgecamError as exc:
        print(f"edgecam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `edgecam explain ... | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _version() -> int:
    from edgecam.core.runtime import get_runtime

    try:
        runtime = str(get_runtime())
    except EdgecamError as exc:
        runtime = f"none ({exc})"
    print(f"edgecam {__version__} (runtime: {runtime})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from edgecam.cli.common import load_classifier

    clf = load_classifier(args, args.model_arg)
    info = clf.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model:    {info['model']}")
    print(f"runtime:  {info['runtime']}")
    i = info["input"]
    print(f"input:    {i['name']} {i['shape']} {i['dtype']} ({i['layout']}, {i['color']}), {i['quantization']}")
    n = i["normalization"]
    print(f"  normalisation:      from {n['source']}: {i['encoding']}")
    if i.get("note"):
        print(f"  note:               {i['note']}")
    h = info["head"]
    print(f"head:     feature map ({h['feature_layout']}) -> {h['pool']} -> {h['linear']} -> "
          f"{'softmax' if h['softmax_output'] else 'logits'}")
    for key in ("feature_map", "classifier_weights", "classifier_bias", "logits", "output"):
        t = h[key]
        if t:
            print(f"  {key + ':':20s}#{t['index']} {t['name']!r} {t['shape']} {t['dtype']}, {t['quantization']}")
    print(f"classes:  {info['classes']}; labels {info['labels']} from {info['labels_source']}")
    for line in info["repairs"]:
        print(f"repaired: {line}")
    for line in info["warnings"]:
        print(f"warning:  {line}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from edgecam.core import manifest as m

    if args.models_command == "list":
        manifest = m.load_manifest()
        cache = m.cache_dir()
        for name, entry in manifest.models.items():
            path = cache / name / entry.filename
            state = "cached" if path.exists() else "not cached"
            flag = " (default)" if name == manifest.default else ""
            print(f"{name}{flag}: {state}; {entry.description}")
        print(f"cache: {cache}")
        return 0
    if args.models_command == "fetch":
        manifest = m.load_manifest()
        names = list(manifest.models) if args.all else (args.names or [manifest.default])
        for name in names:
            local, done = m.fetch(manifest.get(name), mirror=args.mirror)
            verb = "fetched" if done else "already cached"
            print(f"{name}: {verb}, {local.path}")
        return 0
    if args.models_command == "prepare":
        from edgecam.core.model import analyse, prepare, read_model

        if args.output.exists() and args.input.exists() and args.output.samefile(args.input):
            raise EdgecamError(f"{args.output}: is the input model itself; write the prepared copy elsewhere")
        data = read_model(args.input)
        _, head = analyse(args.input, data)
        out, repairs = prepare(data, head)
        for note in repairs:
            print(f"{args.output}: repaired: {note}")
        tmp = args.output.with_name(args.output.name + ".tmp")
        try:
            tmp.write_bytes(out)
            tmp.replace(args.output)
        except OSError as exc:
            raise EdgecamError(f"{args.output}: cannot write ({exc.strerror or exc})") from None
        print(f"{args.output}: outputs now include the feature map #{head.feature} and the logits #{head.logits}")
        return 0
    args.print_usage(sys.stderr)
    return 2


def _config(args: argparse.Namespace) -> int:
    from edgecam.device import config

    if args.config_command == "check":
        cfg, origin = config.effective_config(args)
        print(f"# edgecam {__version__}: configuration from {origin}, environment and flags; valid")
        print(config.to_toml(cfg), end="")
        return 0
    if args.config_command == "default":
        print(f"# edgecam {__version__} configuration: /etc/edgecam/edgecam.toml. Every key is optional;")
        print("# the commented value is the default. EDGECAM_<SECTION>_<KEY> variables and flags override.")
        print(config.describe_keys(), end="")
        return 0
    if args.config_command == "reference":
        from edgecam.device.reference import reference

        print(reference(), end="")
        return 0
    args.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
