"""The `medanomaly` command: synth | list | train | detect | evaluate | demo | benchmark.

Every bundle workflow runs through `medanomaly.bundles.run_bundle`, in its own process, exactly
as `python -m monai.bundle run` would run it; this module only parses arguments and reports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from medanomaly.bundles import find_bundle, list_bundles
from medanomaly.bundles.input_files import expand_inputs
from medanomaly.bundles.model_info import ModelInfoError
from medanomaly.bundles.outputs import SUMMARY_FILE
from medanomaly.bundles.registry import REPOSITORY_ROOT, BundleNotFound
from medanomaly.bundles.runner import check_distributed, check_override_keys, config_keys, distributed_config
from medanomaly.console import CommandError, format_metrics, parse_overrides, run_workflow, written_since

_REPOSITORY_README = REPOSITORY_ROOT / "README.md"


def _output_folder(path: str) -> str:
    """Creates the output folder and checks it takes files, before any work starts."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"error: the output folder {folder} is a file; give a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"error: cannot create the output folder {folder} ({err.strerror}).") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"error: the output folder {folder} is not writable; choose another (--output-dir).")
    return str(folder.resolve())


def _check_inputs_exist(inputs: list[str], mask: str | None) -> None:
    """Stops before the bundle starts when an input names no volume (the bundle expands them alike)."""
    try:
        expand_inputs(inputs)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    if mask and not Path(mask).exists():
        raise SystemExit(f"error: the brain mask {mask} does not exist.")


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a threshold is a finite number >= 0 (maps are >= 0; "
                                         "a negative one would flag every voxel)")
    return value


def cmd_synth(args) -> None:
    from medanomaly.data import cohort_root, generate_cohort

    root = Path(args.root) if args.root else cohort_root(args.preset)
    datalist = generate_cohort(root, preset=args.preset, seed=args.seed, workers=args.workers,
                               overwrite=args.overwrite, contrasts=args.contrasts)
    print(f"Cohort '{args.preset}' (seed {args.seed}): {datalist}")
    for path in sorted(root.glob("datalist_*.json")):
        print(f"  {path.stem.removeprefix('datalist_')}: {path}")
    if (root / "montage.png").is_file():
        print(f"Montage: {root / 'montage.png'}")


def cmd_list(args) -> None:
    bundles = list_bundles()
    if args.json:
        print(json.dumps([b.summary() for b in bundles], indent=2))
        return
    for bundle in bundles:
        weights = "weights" if bundle.has_weights else "no weights"
        weights = "demo weights" if bundle.weights_need_demo_config else weights
        contrast = (bundle.weights_contrast or "unknown") if bundle.has_weights else "-"
        print(f"{bundle.name:<10} {bundle.version:<8} {weights:<13} {contrast:<11} {bundle.metadata.get('task', '')}")


def _common_overrides(args, workflow: str) -> dict:
    try:
        overrides = parse_overrides(args.set)
        check_override_keys(args.bundle, workflow, overrides, distributed=getattr(args, "nproc", None) is not None)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for key in ("device", "output_dir", "datalist", "model_dir", "threshold", "contrast"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "strict", False):
        overrides["strict_contrast"] = True
    return overrides


def _check_distributed(args, workflows: tuple[str, ...]) -> None:
    """`--nproc`: each bundle has the workflows' multi-process overlays, and each process chooses
    its own device."""
    from medanomaly.benchmark import parse_variant

    if args.nproc is None:
        return
    try:
        # benchmark without --bundles: every bundle found, as the benchmark runs them
        names = getattr(args, "bundles", None) or ([args.bundle] if hasattr(args, "bundle") else
                                                   [b.name for b in list_bundles()])
        for bundle in names:
            for workflow in workflows:
                check_distributed(find_bundle(parse_variant(bundle)[0]), workflow)
    except (ValueError, BundleNotFound) as err:
        raise SystemExit(f"error: {err}") from None
    if args.device not in (None, "cpu"):
        raise SystemExit(f"error: with --nproc each process runs on its own GPU (cuda:<local rank>), or on the CPU "
                         f"when there is none; --device {args.device} would put them all on one. Leave --device out, "
                         "or give --device cpu (gloo).")


def _settings_for(bundle: str, workflow: str, settings: dict) -> dict:
    """The `--set` settings of a training that the workflow after it also has (e.g. a changed
    `network_def#channels`, so calibration builds the network that was trained); training-only
    ones (`init_from`, `num_iterations`) stay with the training."""
    known = config_keys(find_bundle(bundle), workflow)
    return {key: value for key, value in settings.items() if str(key).split("#")[0] in known}


def cmd_train(args) -> None:
    _check_distributed(args, ("train",))
    overrides = _common_overrides(args, "train")
    output_dir = Path(_output_folder(overrides.get("output_dir") or str(Path("runs") / args.bundle)))
    overrides["output_dir"] = str(output_dir)
    # training in --nproc processes (torchrun, DDP); the post-train workflows too where the bundle has
    # their multi-process overlay; calibration in one process (few healthy validation volumes)
    run_workflow(args.bundle, "train", overrides, demo=args.demo, nproc=args.nproc)
    model_dir = output_dir / "models"
    # the bundle's own post-train workflows (e.g. scrps' latent repository), then calibration
    bundle = find_bundle(args.bundle)
    after = [*bundle.post_train_workflows, *([] if args.no_calibrate else ["calibrate"])]
    for workflow in after:
        settings = {"model_dir": str(model_dir),
                    "output_dir": str(output_dir / ("calibration" if workflow == "calibrate" else workflow))}
        for key in ("datalist", "device", "contrast"):
            if key in overrides:
                settings[key] = overrides[key]
        settings.update(_settings_for(args.bundle, workflow, parse_overrides(args.set)))
        sharded = args.nproc is not None and workflow != "calibrate" and bundle.has_config(distributed_config(workflow))
        run_workflow(args.bundle, workflow, settings, demo=args.demo, nproc=args.nproc if sharded else None)
    print(f"Weights and threshold: {model_dir}\n"
          f"Detect with them: medanomaly detect {args.bundle} SCAN --model-dir {model_dir}"
          + (f" --contrast {overrides['contrast']}" if "contrast" in overrides else "")
          + (" --demo" if args.demo else ""))


def cmd_detect(args) -> None:
    overrides = _common_overrides(args, "inference")
    _check_inputs_exist(args.inputs, args.mask)
    overrides["input"] = args.inputs if len(args.inputs) > 1 else args.inputs[0]
    overrides["output_ext"] = "." + args.format.lstrip(".")
    if args.mask:
        overrides["mask"] = args.mask
    if args.contrast:
        overrides["input_contrast"] = args.contrast  # what the inputs are when their names do not say
    overrides["output_dir"] = _output_folder(overrides.get("output_dir") or str(Path("outputs") / args.bundle))
    started = run_workflow(args.bundle, "inference", overrides, demo=args.demo)
    summary = Path(overrides["output_dir"]) / SUMMARY_FILE
    if not written_since(summary, started):
        raise SystemExit(f"error: the run ended without writing {summary}; see the log above.")
    for record in json.loads(summary.read_text()):
        print(f"{record['subject']}: volume score {record['volume_score']:.4f} -> {record['heatmap']}")


def cmd_evaluate(args) -> None:
    _check_distributed(args, ("evaluate",))
    overrides = _common_overrides(args, "evaluate")
    default_folder = Path("outputs") / args.bundle / "evaluate"
    overrides["output_dir"] = _output_folder(overrides.get("output_dir") or str(default_folder))
    if args.keys:
        overrides["datalist_keys"] = args.keys
    started = run_workflow(args.bundle, "evaluate", overrides, demo=args.demo, quiet=True, nproc=args.nproc)
    path = Path(overrides["output_dir"]) / "metrics.json"
    if not written_since(path, started):
        raise SystemExit(f"error: the evaluation ended without writing {path}.")
    print(format_metrics(args.bundle, json.loads(path.read_text())))


def cmd_demo(args) -> None:
    from medanomaly.demo import run_demo

    run_demo(bundle=args.bundle, output_dir=Path(args.output_dir), device=args.device, cohort=args.cohort,
             contrast=args.contrast)


def cmd_benchmark(args) -> None:
    from medanomaly.benchmark import load_results, run_benchmark, write_tables
    from medanomaly.report import update_bundle_metadata, update_readme, write_report

    output_dir = Path(args.output_dir).resolve()
    if args.report_only:
        results = load_results(output_dir)
        results["report"] = str(write_report(results, output_dir))
        write_tables(results, output_dir)
        print(f"Report: {results['report']}")
    else:
        _check_distributed(args, ("evaluate",))
        command = "medanomaly " + shlex.join(args.argv)
        results = run_benchmark(bundles=args.bundles, cohort=args.cohort, output_dir=output_dir, device=args.device,
                                demo=args.demo, n_bootstrap=args.n_bootstrap, models_root=args.models_root,
                                command=command, timeout_minutes=args.timeout_minutes, merge=args.merge,
                                contrast=args.contrast, nproc=args.nproc)
    if args.update_readme:
        print(f"Updated {update_readme(Path(args.update_readme), results)}")
        for path in update_bundle_metadata(results):  # the same numbers as the README's table
            print(f"Updated {path}")


def _process_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: the number of processes is at least 1")
    return value


def _nproc_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--nproc", type=_process_count, metavar="N", help=help)


def _contrast(name: str) -> str:
    from medanomaly.data.contrast import check_contrast

    try:
        return check_contrast(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _contrast_options(parser: argparse.ArgumentParser, help: str, strict: bool = False) -> None:
    """`--contrast` (the bundle's `contrast` override) and, with `strict`, `--strict`."""
    parser.add_argument("--contrast", type=_contrast, help=f"T1w | T2w | FLAIR: {help}")
    if strict:
        parser.add_argument("--strict", action="store_true",
                            help="stop with an error, not a warning, when an input's contrast is not the weights' "
                                 "(strict_contrast: true)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medanomaly", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="generate (or find cached) a synthetic brain-MRI cohort")
    synth.add_argument("--preset", default="demo", choices=["tiny", "demo", "full"])
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--root", help="output folder (default: $MEDANOMALY_HOME/cohorts/<preset>)")
    synth.add_argument("--workers", type=int)
    synth.add_argument("--overwrite", action="store_true")
    synth.add_argument("--contrasts", nargs="+", default=["all"], metavar="CONTRAST",
                       help="T1w T2w FLAIR, or all (default): one datalist_<C>.json per contrast")
    synth.set_defaults(func=cmd_synth)

    listing = commands.add_parser("list", help="list the bundles found")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    def bundle_command(name, help, func):
        sub = commands.add_parser(name, help=help)
        sub.add_argument("bundle", help="bundle name (see `medanomaly list`) or folder")
        sub.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
        sub.add_argument("--output-dir", dest="output_dir")
        sub.add_argument("--set", action="append", metavar="KEY=VALUE", help="any bundle config override")
        demo = sub.add_mutually_exclusive_group()
        demo.add_argument("--demo", dest="demo", action="store_true", default=None,
                          help="use the bundle's demo overlay (default for the shipped demo weights)")
        demo.add_argument("--paper-scale", dest="demo", action="store_false", help="never add the demo overlay")
        sub.set_defaults(func=func)
        return sub

    train = bundle_command("train", "train a bundle, run its post-train workflows (e.g. a latent repository), "
                                    "then calibrate its threshold on healthy volumes", cmd_train)
    train.add_argument("--datalist", help="Decathlon-style JSON or a synthetic preset (tiny | demo | full)")
    train.add_argument("--no-calibrate", action="store_true")
    _nproc_option(train, "train in N processes on this machine, one per GPU (NCCL; gloo on CPUs), with torchrun "
                         "and the bundle's configs/multi_gpu_train.yaml; post-train workflows and calibration "
                         "then run in one process. Several machines: docs/DISTRIBUTED.md")
    _contrast_options(train, "contrast of a synthetic preset's datalist (default T1w); recorded with the weights")

    detect = bundle_command("detect", "heatmap + segmentation for volumes", cmd_detect)
    detect.add_argument("inputs", nargs="+", help="volume files, DICOM folders, folders or globs")
    detect.add_argument("--mask", help="brain mask of a single input (default: from the skull-stripped image)")
    detect.add_argument("--model-dir", dest="model_dir", help="folder with model.pt and model_info.json")
    detect.add_argument("--threshold", type=_threshold, help="segmentation threshold (default: calibrated)")
    detect.add_argument("--format", default="nii.gz", choices=["nii.gz", "nrrd", "mha"])
    _contrast_options(detect, "contrast of inputs whose file names do not say it (BIDS suffix _T1w, _T2w, _FLAIR)",
                      strict=True)

    evaluate = bundle_command("evaluate", "metrics on a labelled cohort", cmd_evaluate)
    evaluate.add_argument("--datalist", help="Decathlon-style JSON or a synthetic preset (default: demo)")
    evaluate.add_argument("--keys", nargs="+", help="datalist keys (default: test_lesion test_healthy)")
    evaluate.add_argument("--model-dir", dest="model_dir")
    evaluate.add_argument("--threshold", type=_threshold)
    _contrast_options(evaluate, "contrast of a synthetic preset's datalist (default T1w)", strict=True)
    _nproc_option(evaluate, "score the volumes in N processes, one per GPU (gloo on CPUs), with torchrun and the "
                            "bundle's configs/multi_gpu_evaluate.yaml: the same metrics as one process")

    demo = commands.add_parser("demo", help="detect lesions in a synthetic scan with the demo weights")
    demo.add_argument("--bundle", default="dae")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--device")
    demo.add_argument("--cohort", default="demo", help="synthetic preset to draw the scan from (tiny | demo | full)")
    demo.add_argument("--contrast", type=_contrast,
                      help="T1w | T2w | FLAIR (default: the contrast the bundle's weights were trained on)")
    demo.set_defaults(func=cmd_demo)

    benchmark = commands.add_parser("benchmark", help="evaluate bundles on one cohort; tables and an HTML report")
    benchmark.add_argument("--bundles", nargs="+", help="names or folders (default: every bundle found; those "
                           "without weights or an evaluate config are listed as such); a variant row is "
                           "name[key=value,...], e.g. 'phanes[mode=ra]' 'sagan[model=brainomaly]'")
    benchmark.add_argument("--cohort", default="demo", help="tiny | demo | full | a datalist JSON")
    benchmark.add_argument("--contrast", help="T1w | T2w | FLAIR | all (one after the other): the cohort's datalist "
                           "of that contrast, and the bundles' `contrast` override (default: T1w; for a datalist "
                           "JSON its own top-level \"contrast\")")
    benchmark.add_argument("--output-dir", default="outputs/benchmark")
    benchmark.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    scale = benchmark.add_mutually_exclusive_group()
    scale.add_argument("--demo", dest="demo", action="store_true", default=None,
                       help="always add the demo overlays (default: the overlay the weights were trained with)")
    scale.add_argument("--paper-scale", dest="demo", action="store_false",
                       help="never add the demo overlays (paper-scale weights, e.g. from --models-root; GPU)")
    benchmark.add_argument("--models-root", dest="models_root", type=Path,
                           help="folder with <bundle>/models/model.pt per bundle (what `medanomaly train` writes "
                                "under runs/); bundles without one there use their shipped weights")
    benchmark.add_argument("--n-bootstrap", dest="n_bootstrap", type=int, default=200,
                           help="bootstrap resamples of the confidence intervals")
    benchmark.add_argument("--timeout-minutes", dest="timeout_minutes", type=float,
                           help="stop a bundle's evaluation after this long and report it as failed")
    _nproc_option(benchmark, "evaluate each bundle in N processes, one per GPU (gloo on CPUs), with torchrun and its "
                             "configs/multi_gpu_evaluate.yaml: the same metrics as one process")
    benchmark.add_argument("--merge", action="store_true",
                           help="keep the output folder's earlier results of the bundles not run now (same cohort)")
    benchmark.add_argument("--report-only", action="store_true",
                           help="redraw the report from the output folder's results.json, run nothing")
    benchmark.add_argument("--update-readme", nargs="?", const=str(_REPOSITORY_README), metavar="README",
                           help="write the results table between the README's benchmark markers")
    benchmark.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if getattr(args, "bundle", None) and args.command not in ("demo",):
            find_bundle(args.bundle)  # fail early with the list of bundles
        args.func(args)
    except (BundleNotFound, ModelInfoError, CommandError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
