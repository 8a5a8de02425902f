"""The `fedxr` console script: thin subcommands that parse arguments and call one function each.

Heavy imports (pydantic, pandas, torch, NVFlare) happen inside the command functions so that `fedxr --help`
and `fedxr --version` are instant and work in an edge-only install (`pip install fedxr`); each command
loads only what it needs. Errors and exit codes follow :func:`fedxr.errors.run_command`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedxr import __version__
from fedxr import defaults as D
from fedxr.errors import FedxrError, run_command
from fedxr.export.cli import DESCRIPTION as EXPORT_DESCRIPTION
from fedxr.export.cli import add_arguments as add_export_arguments


def cmd_check(args: argparse.Namespace) -> int:
    from fedxr.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.privacy.dp and recipe.privacy.dp.delta is not None and recipe.layout.sites_summary.is_file():
        from fedxr.privacy.dp import delta_problems

        # δ depends on each site's training images: checked here when this run's sites exist (and at each site).
        if problems := delta_problems(recipe, recipe.layout.sites):
            raise FedxrError(f"recipe {args.recipe}:\n" + "\n".join(f"  - {p}" for p in problems))
    print(f"# {args.recipe}: OK (resolved, with every default filled in)")
    print(recipe.to_yaml(), end="")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from fedxr.data.inspect import format_stats, inspect_path

    stats = inspect_path(args.path)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from fedxr.data.manifest import build_site_manifests, format_summary, summarise, write_manifests
    from fedxr.data.labelcsv import is_labels_csv, load_labels_dataset
    from fedxr.data.nih import load_dataset

    if is_labels_csv(Path(args.root)):  # a hospital's labels CSV (or a folder holding labels.csv)
        dataset = load_labels_dataset(Path(args.root), missing=args.missing,
                                      site_column=args.column if args.scheme == "column" else None)
    else:
        dataset = load_dataset(args.root, missing=args.missing)
    if dataset.dropped:
        print(f"dropped {dataset.dropped} listed image(s) not found under {args.root} (--missing drop)")
    settings = {
        "root": str(Path(args.root).resolve()), "sites": args.sites, "scheme": args.scheme, "alpha": args.alpha,
        # as `fedxr data prepare` records it: a column only where it decides the sites
        "column": args.column if args.scheme == "column" else None, "seed": args.seed, "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction, "min_site_patients": args.min_site_patients,
    }
    manifests, details = build_site_manifests(
        dataset, args.sites, args.scheme, seed=args.seed, alpha=args.alpha, column=args.column,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, min_size=args.min_site_patients,
    )
    write_manifests(args.out, manifests, {**settings, **details}, force=args.force)
    print(format_summary(summarise(manifests)))
    print(f"\nwrote {len(manifests)} site manifest(s) to {args.out}/ (site-N.csv, sites.json)")
    return 0


def cmd_data_phantom(args: argparse.Namespace) -> int:
    from fedxr.data.phantom import generate_phantom

    summary = generate_phantom(
        args.out, patients=args.patients, hospitals=args.hospitals, size=args.size, seed=args.seed,
        labels_from=args.labels_from, workers=args.workers, force=args.force,
    )
    print(f"wrote {summary['images']} images of {args.patients} patients from {args.hospitals} hospitals "
          f"({summary['boxes']} boxes) to {args.out}/")
    print(f"  look at {Path(args.out) / 'contact_sheet.png'}; next: fedxr data split {args.out} "
          f"--sites {args.hospitals} --scheme column --column hospital --out {Path(args.out).name}_sites")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from fedxr.config import load_recipe
    from fedxr.data.prepare import ensure_dataset, ensure_sites

    recipe = load_recipe(args.recipe, args.overrides)
    root, made = ensure_dataset(recipe)
    print(f"data: {'generated' if made else 'found'} {root}")
    folder, written = ensure_sites(recipe, force=args.force)
    print(f"sites: {'wrote' if written else 'up to date,'} {folder}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from fedxr.models.registry import format_table

    print(format_table())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fedxr.config import load_recipe
    from fedxr.data.prepare import require_sites
    from fedxr.training import train

    recipe = load_recipe(args.recipe, args.overrides)
    if args.mode == "local" and not args.site:
        raise FedxrError("--mode local needs --site NAME (e.g. --site site-1)")
    summary = train(recipe, require_sites(recipe, args.recipe), mode=args.mode, site=args.site)
    print(f"best val_auroc {summary['best_val_auroc']:.4f}; checkpoints in {summary['folder']}/ (best.ckpt, last.ckpt)")
    print(f"next: fedxr evaluate {summary['best']} --data {recipe.layout.sites} --split test")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedxr.evaluation import evaluate_checkpoint, format_result

    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, out=args.out,
                                 batch_size=args.batch_size, cache_dir=args.cache_dir, progress=not args.json)
    print(json.dumps({**result.to_json(), "out": result.out}, indent=2) if args.json else format_result(result))
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from fedxr.config import load_recipe
    from fedxr.federated.run import federate, format_summary

    recipe = load_recipe(args.recipe, args.overrides)
    env = args.env or recipe.federated.env
    if args.export_job:
        print(format_summary(federate(recipe, env=env, export_job=args.export_job, recipe_path=args.recipe), recipe))
    else:
        print(format_summary(federate(recipe, env=env, startup_kit=args.startup_kit, recipe_path=args.recipe,
                                      restart=args.restart_stage), recipe))
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    from fedxr.errors import EXIT_CHECK_FAILED
    from fedxr.federated.deploy import preflight

    results = [preflight(kit) for kit in args.kits]
    for r in results:
        print(r.summary())
    return 0 if all(r.ok for r in results) else EXIT_CHECK_FAILED


def cmd_distill(args: argparse.Namespace) -> int:
    from fedxr.config import load_recipe
    from fedxr.distill.run import distill

    recipe = load_recipe(args.recipe, args.overrides)
    env = args.env or recipe.federated.env
    distilled = distill(recipe, args.teacher, mode=args.mode, env=env, site=args.site, recipe_path=args.recipe,
                        startup_kit=args.startup_kit)
    if env == "prod" and (args.mode or recipe.distill.mode) == "federated":
        print("production run: score the students on a site with `fedxr evaluate CKPT --data SITE_MANIFESTS`")
        return 0
    from fedxr.distill.report import compare_students

    compare_students(recipe, distilled)  # what `fedxr run` shows in its evaluate stage
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from fedxr.explain import explain, format_explain

    out = args.out or str(Path(args.checkpoints[0]).parent / "explain")
    report = explain(args.checkpoints, args.data, out, n=args.n, boxes_csv=args.boxes, max_boxes=args.max_boxes,
                     val_boxes=args.val_boxes)
    print(format_explain(report))
    return 0


def cmd_edge_federate(args: argparse.Namespace) -> int:
    from fedxr.config import load_recipe
    from fedxr.crossdevice.run import edge_federate, format_summary

    print(format_summary(edge_federate(load_recipe(args.recipe, args.overrides), init_from=args.init_from)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedxr.config import load_recipe
    from fedxr.pipeline import run_pipeline

    run_pipeline(load_recipe(args.recipe, args.overrides), args.recipe, force=args.force, start=args.start,
                 restart_stage=args.restart_stage)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedxr", description="Federated chest X-ray training, distillation and edge export.")
    parser.add_argument("--version", action="version", version=f"fedxr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_recipe_commands(sub)
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_model_commands(sub)
    return parser


def _add_recipe_commands(sub) -> None:
    """`fedxr run` (every stage) and `fedxr check` (the recipe as resolved)."""
    from fedxr.pipeline import STAGE_NAMES

    p = sub.add_parser("run", help="every stage of a recipe: data, sites, teacher, distill, export, evaluate, "
                                   "explain, report (up-to-date stages are skipped)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--from", dest="start", choices=STAGE_NAMES, help="rerun this stage and every later one")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument("--restart-stage", action="store_true",
                   help="a federated stage an interrupted run left part-way starts from round 0 instead of resuming")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a recipe and print the resolved config")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as federated.rounds=5")
    p.set_defaults(func=cmd_check)


def _add_data_commands(sub) -> None:
    """`fedxr data inspect | prepare | phantom | split`."""
    data = sub.add_parser("data", help="inspect, generate and split data sets").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("inspect", help="counts for a data folder, label CSV or bounding-box CSV")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="emit JSON instead of a table")
    p.set_defaults(func=cmd_data_inspect)

    p = data.add_parser("prepare", help="generate (phantom) data and write site manifests as a recipe says")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help="rewrite the site manifests even if up to date")
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser("phantom", help="generate the built-in phantom data set in the NIH layout")
    p.add_argument("--out", required=True, help="output folder (created atomically)")
    p.add_argument("--patients", type=int, default=D.PHANTOM_PATIENTS)
    p.add_argument("--hospitals", type=int, default=D.PHANTOM_HOSPITALS)
    p.add_argument("--size", type=int, default=D.PHANTOM_SIZE, help="image size in pixels (>= 32)")
    p.add_argument("--seed", type=int, default=D.PHANTOM_SEED)
    p.add_argument("--labels-from", help="NIH label CSV to sample label sets and patient structure from")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_data_phantom)

    p = data.add_parser("split", help="partition a data set into hospital sites (patient-wise)")
    p.add_argument("root", help="data folder in the NIH layout")
    p.add_argument("--sites", type=int, required=True)
    # The recipe's defaults (fedxr/defaults.py), so that this command and `fedxr data prepare` split a folder alike.
    p.add_argument("--scheme", choices=["iid", "dirichlet", "quantity", "column"], default=D.SPLIT_SCHEME,
                   help=f"default {D.SPLIT_SCHEME} (one site per --column value); iid for random patient-wise sites")
    p.add_argument("--alpha", type=float, default=D.DIRICHLET_ALPHA, help="Dirichlet concentration (dirichlet, quantity)")
    p.add_argument("--column", default=D.SITE_COLUMN,
                   help=f"per-patient column for --scheme column (default {D.SITE_COLUMN}; e.g. source, view)")
    p.add_argument("--seed", type=int, default=D.DATA_SEED)
    p.add_argument("--val-fraction", type=float, default=D.VAL_FRACTION)
    p.add_argument("--test-fraction", type=float, default=D.TEST_FRACTION, help="used when there is no test_list.txt")
    p.add_argument("--min-site-patients", type=int, default=D.MIN_SITE_PATIENTS)
    p.add_argument("--missing", choices=["error", "drop"], default="error", help="listed images not on disk")
    p.add_argument("--out", required=True, help="folder for site-N.csv manifests")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_data_split)


def _add_training_commands(sub) -> None:
    """The model registry and the commands that train: central/local, federated, distillation."""
    models = sub.add_parser("models", help="the model registry").add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = models.add_parser("list", help="name, role, parameters, MACs and input size of every model")
    p.set_defaults(func=cmd_models_list)

    p = sub.add_parser("train", help="centralised (all sites pooled) or single-site training")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--mode", choices=["central", "local"], default="central")
    p.add_argument("--site", help="site name for --mode local (site-1, site-2, ...)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("federate", help="federated training of the teacher with NVFlare (sim, poc or prod)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--env", choices=["sim", "poc", "prod"], help="default: the recipe's federated.env (sim)")
    p.add_argument("--startup-kit", help="admin startup kit folder, for --env prod")
    p.add_argument("--export-job", metavar="DIR", help="write the NVFlare job folder for an admin to submit, and stop")
    p.add_argument("--restart-stage", action="store_true",
                   help="start from round 0 even if an interrupted run of the same job can be resumed")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("edge-federate", help="fine-tune the student across simulated point-of-care devices "
                                             "(NVFlare edge, asynchronous FedBuff; the recipe's edge_federation)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--init-from", help="student checkpoint to start from (default: edge_federation.init_from, else "
                                       "the run's first student)")
    p.set_defaults(func=cmd_edge_federate)

    p = sub.add_parser("preflight", help="NVFlare's preflight check of startup kits (server: ports, storage, dry run; "
                                         "hospital or admin: the server answers over mutual TLS); exit 3 if one fails")
    p.add_argument("kits", nargs="+", metavar="KIT", help="a participant's folder from provisioning")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("distill", help="distil the federated teacher into the recipe's small students")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--teacher", help="teacher checkpoint (default: the run's federate/global_best.ckpt)")
    p.add_argument("--mode", choices=["federated", "central"], help="default: the recipe's distill.mode")
    p.add_argument("--env", choices=["sim", "poc", "prod"], help="default: the recipe's federated.env")
    p.add_argument("--site", help="for --mode central: the site that distils on its own data (default: the first)")
    p.add_argument("--startup-kit", help="admin startup kit folder, for --env prod")
    p.set_defaults(func=cmd_distill)


def _add_model_commands(sub) -> None:
    """What is done with a trained model: explain, export, evaluate, and the console that shows it all."""
    p = sub.add_parser("explain", help="Grad-CAM heatmaps on boxed test images and the pointing game")
    p.add_argument("checkpoints", nargs="+", help="one or more checkpoints (teacher, students) to compare")
    p.add_argument("--data", required=True, help="site manifest folder or one site-N.csv (its test split is used)")
    p.add_argument("--boxes", help="BBox_List_2017.csv (default: the one in the data set's root)")
    p.add_argument("--n", type=int, default=16, help="images in the grid")
    p.add_argument("--max-boxes", type=int, default=200, help="boxes scored in the pointing game")
    p.add_argument("--val-boxes", type=int, default=200,
                   help="validation boxes that choose each model's Grad-CAM layer (0: the resolution rule)")
    p.add_argument("--out", help="output folder (default: explain/ beside the first checkpoint)")
    p.set_defaults(func=cmd_explain)

    add_export_arguments(sub.add_parser("export", help="a checkpoint → verified ONNX files and manifest.json "
                                        "(also: python -m fedxr.export)", description=EXPORT_DESCRIPTION))

    from fedxr.console.cli import add_arguments as add_console_arguments

    add_console_arguments(sub.add_parser("console", help="the web application: federation, sites, models, try an "
                                         "image (add users with `fedxr console add-user`)"))

    p = sub.add_parser("evaluate", help="score a checkpoint: per-class AUROC/AP, sensitivity/specificity")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="site manifest folder or one site-N.csv")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--out", help="output folder (default: eval_SPLIT beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=D.CACHE_DIR)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`fedxr train R --mode local federated.rounds=2`); argparse
    # leaves those as extras, which are accepted only by commands that take overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
