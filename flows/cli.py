"""The ``indusfactory`` command line (the console script of pyproject's ``[project.scripts]``).

It lives with the orchestration layer: it runs the flows and sets Prefect's settings, which the
library (``indusfactory/``) never does. Each command imports what it needs when it runs, so
``indusfactory --help`` stays quick.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "indusfactory")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# An offline factory: a temporary Prefect API must not try to phone home (it logs an error without a network).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(help="indusfactory: synthetic self-annotated industrial defect datasets.", no_args_is_help=True)

STAGES = ("ingest", "learn-concept", "learn-condition", "generate-dataset", "evaluate-dataset")


class GenerationBar:
    """A tqdm bar of the generation stage: samples done / planned, and images/s of those generated here.

    Fed by ``indusfactory.generation.generate.progress_listener`` (batches of the shards this process generates;
    shards already on storage advance it at once without counting towards images/s).
    """

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} samples [{elapsed}{postfix}]"

    def __init__(self, file=None):
        self.bar = None
        self.file = file
        self.generated = 0
        self.started: float | None = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=event.planned, desc="generate", bar_format=self.FORMAT, file=self.file, dynamic_ncols=True
            )
        if event.generated:
            self.started = self.started or time.perf_counter()
            self.generated += event.samples
        if self.generated and self.started is not None:
            self.bar.set_postfix_str(
                f"{self.generated / max(time.perf_counter() - self.started, 1e-9):.2f} images/s", refresh=False
            )
        self.bar.update(event.samples)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def _progress(stage: str) -> Iterator[None]:
    """A progress bar over the generation batches while the stage generates images."""
    if stage != "generate-dataset":
        yield
        return
    from indusfactory.generation.generate import progress_listener

    bar = GenerationBar()
    try:
        with progress_listener(bar):
            yield
    finally:
        bar.close()


def _run_flow(config, stage: str):
    """Run one stage flow against the configured Prefect API, or a temporary one this command starts and
    stops (``flows.local_api``). Ctrl-C and SIGTERM stop it within seconds, keeping what is finished: the
    command exits 130 / 143 saying how to resume; a second Ctrl-C exits at once."""
    from indusfactory.infra import stopping
    from indusfactory.infra.errors import IndusfactoryError

    if stage not in STAGES:
        raise typer.BadParameter(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    started = time.perf_counter()
    try:
        with stopping.stopping_on_signals(on_repeat=_exit_at_once, take_ignored=True):
            from flows.local_api import local_api

            with local_api():
                module = __import__(f"flows.{stage.replace('-', '_')}", fromlist=["*"])
                flow = getattr(module, stage.replace("-", "_"))
                with _progress(stage):
                    result = flow(config=config)
    except BaseException as exc:
        if not (stopping.stop_requested() or isinstance(exc, KeyboardInterrupt)):
            if isinstance(exc, IndusfactoryError):
                typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from exc
            raise
        signum = stopping.stop_signal()
        name = signal.Signals(signum).name if signum else "Ctrl-C"
        typer.secho(
            f"stopped by {name} after {time.perf_counter() - started:.1f} s: what was finished is kept "
            "(trained models, training checkpoints, written shards); run the same command again to resume.",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(stopping.exit_code(signum)) from None
    typer.secho(f"{stage} finished in {time.perf_counter() - started:.1f} s", fg=typer.colors.GREEN)
    return result


def _exit_at_once(signum: int) -> None:  # pragma: no cover - ends the process
    """A second Ctrl-C: kill the temporary Prefect API and leave without waiting for anything."""
    from flows.local_api import kill_now
    from indusfactory.infra import stopping

    kill_now()
    sys.stderr.write("\nstopped at once (second Ctrl-C); run the same command again to resume\n")
    stopping.hard_exit(signum)


def _print_dataset(record) -> None:
    typer.echo(f"dataset: {record.uri}  ({record.samples} samples, {record.shards} shards)")
    typer.echo(f"  pandas:      pd.read_parquet('{record.uri}/data/')")
    typer.echo(f"  datasets:    load_dataset('{record.uri}')")
    typer.echo(f"  pycocotools: COCO('{record.uri}/annotations/instances_train.json')")
    from indusfactory.publishing.catalogue import version_lines

    for line in version_lines(record.uri):
        typer.echo(f"  {line}")
    adherence = getattr(record, "adherence", None)
    if adherence:
        typer.echo(
            f"  labels:      {adherence['verdict']} (median label AUC {adherence['median_auc']:.3f} vs chance "
            f"{adherence['chance_auc']:.3f}; {adherence['fraction_darker']:.0%} of samples darker inside "
            "their label)"
        )
        if adherence["verdict"] != "follows labels":
            typer.echo(
                "  WARNING: the defects are not where the labels say; do not train on this dataset "
                "(see the condition model card's held-out adherence).",
                err=True,
            )


@app.command()
def demo(
    factory_root: str = typer.Option("./factory", help="Where everything is written."),
    sample_data: str = typer.Option("./sample-data", help="Where the sample dataset is made if missing."),
):
    """Run the whole chain on the embedded default: sample data, tiny model, CPU, local Prefect."""
    from indusfactory.config import FactoryConfig, SourceConfig

    root = Path(sample_data)
    config = FactoryConfig(
        factory_root=factory_root,
        source=SourceConfig(
            coco_annotations=str(root / "defective" / "annotations.json"),
            images_dir=str(root / "defective" / "images"),
            defect_free_dir=str(root / "defect_free"),
        ),
    )
    _print_dataset(_run_flow(config, "generate-dataset"))


@app.command()
def run(
    config_file: Path = typer.Argument(..., help="A YAML FactoryConfig."),
    stage: str = typer.Option("generate-dataset", help=f"One of: {', '.join(STAGES)}."),
    profile: str | None = typer.Option(
        None, help="A named preset under the file (demo, smoke, cpu-128, sd15-gpu); the file's keys win."
    ),
):
    """Run the chain (or one stage flow) on a YAML configuration."""
    from indusfactory.config import load_config
    from indusfactory.infra.errors import ConfigError
    from indusfactory.runform import compose_config

    try:
        config = load_config(config_file)
        if profile is not None:
            config, _ = compose_config(profile, str(config_file))
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    result = _run_flow(config, stage)
    if stage == "generate-dataset":
        _print_dataset(result)
    else:
        typer.echo(result.model_dump_json(indent=2))


@app.command("tiny-model")
def tiny_model(
    path: Path = typer.Argument(..., help="Output folder (diffusers layout)."),
    pretrain: bool = typer.Option(
        False,
        help="Pretrain VAE and UNet on general pictures (scikit-image "
        "photographs and shapes; how the shipped model was made; ~32 min on 2 "
        "CPU cores).",
    ),
    vae_steps: int = typer.Option(2500),
    unet_steps: int = typer.Option(3000),
    seed: int = typer.Option(0),
):
    """Write a tiny Stable Diffusion 1.x pipeline (random, or pretrained with --pretrain)."""
    from indusfactory.demo.tiny_model import pretrain_tiny_model, write_tiny_model

    if pretrain:
        pretrain_tiny_model(path, vae_steps=vae_steps, unet_steps=unet_steps, seed=seed, log=typer.echo)
    else:
        write_tiny_model(path, seed=seed)
    typer.echo(f"tiny SD 1.x pipeline written to {path}")


@app.command("sample-data")
def sample_data(
    path: Path = typer.Argument(..., help="Output folder."),
    n_defective: int = typer.Option(24),
    n_defect_free: int = typer.Option(12),
    size: int = typer.Option(64),
    seed: int = typer.Option(0),
):
    """Write the sample industrial dataset (COCO defects + defect-free images) made from skimage photos."""
    from indusfactory.demo.sample_data import write_sample_data
    from indusfactory.infra.errors import BadInputError

    try:
        paths = write_sample_data(path, n_defective=n_defective, n_defect_free=n_defect_free, size=size, seed=seed)
    except (BadInputError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"sample data written: {paths.coco_annotations}, {paths.images_dir}, {paths.defect_free_dir}")


datasets_app = typer.Typer(help="The datasets of a factory root: list, show, diff, gc.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
ROOT_OPTION = typer.Option("./factory", "--factory-root", help="Local path or s3:// URI of the factory root.")


def _catalogue_errors(call):
    from indusfactory.infra.errors import IndusfactoryError

    try:
        return call()
    except IndusfactoryError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc


@datasets_app.command("list")
def datasets_list(factory_root: str = ROOT_OPTION, name: str = typer.Argument(None, help="Only this dataset.")):
    """Every version: latest marked *, counts, labels and evaluation verdicts, models it was made with."""
    from indusfactory.publishing.catalogue import versions

    for row in _catalogue_errors(lambda: [v.row() for v in versions(factory_root, name)]):
        typer.echo(
            f"{'*' if row['latest'] else ' '} {row['dataset']}/{row['version']}  {row['state']}  "
            f"{row['created'] or '-'}  samples={row['samples']} shards={row['shards']} "
            f"flagged={row['flagged']} dropped={row['dropped']}  labels: {row['labels']}  "
            f"evaluation: {row['evaluation']}  concept={row['concept']} condition={row['condition']} "
            f"catalog={row['catalog']}"
        )


@datasets_app.command("show")
def datasets_show(
    ref: str = typer.Argument(..., help="name (its latest version) or name/version."), factory_root: str = ROOT_OPTION
):
    """One version as JSON: counts, lineage and its models' cards, classes, labels, evaluation, contact sheet."""
    from indusfactory.publishing.catalogue import show

    typer.echo(json.dumps(_catalogue_errors(lambda: show(factory_root, ref)), indent=2, default=str))


@datasets_app.command("diff")
def datasets_diff(
    a: str = typer.Argument(..., help="name/version (or name: its latest)."),
    b: str = typer.Argument(..., help="name/version (or name: its latest)."),
    factory_root: str = ROOT_OPTION,
):
    """What changed from A to B: counts, lineage fingerprints, config, class counts, labels, evaluation."""
    from indusfactory.publishing.catalogue import diff

    changes = _catalogue_errors(lambda: diff(factory_root, a, b))
    typer.echo(f"{changes.pop('a')} -> {changes.pop('b')}")
    for section, items in changes.items():
        for key, (old, new) in items.items():
            typer.echo(f"{section}: {key}: {old!r} -> {new!r}")


@datasets_app.command("gc")
def datasets_gc(
    factory_root: str = ROOT_OPTION,
    keep: int = typer.Option(0, min=0, help="Also keep the N newest versions of each dataset."),
    grace_hours: float = typer.Option(24.0, min=0, help="Keep unreferenced models younger than this."),
    delete: str = typer.Option(None, help="Remove what the dry run listed: pass the token it printed."),
):
    """Dry run (default): list the versions and models nothing references. --delete TOKEN removes exactly them."""
    from indusfactory.publishing.catalogue import apply_gc, plan_gc

    seconds = grace_hours * 3600
    if delete:
        removed = _catalogue_errors(lambda: apply_gc(factory_root, delete, keep, seconds))
        for item in removed:
            typer.echo(f"removed {item.kind} {item.uri}")
        typer.echo(f"{len(removed)} removed")
        return
    plan = _catalogue_errors(lambda: plan_gc(factory_root, keep, seconds))
    for item in plan.keep:
        typer.echo(f"keep   {item.kind} {item.uri}  ({item.reason})")
    for item in plan.remove:
        typer.echo(f"remove {item.kind} {item.uri}  ({item.reason})")
    typer.echo(
        f"dry run: {len(plan.remove)} would be removed; to remove exactly these: "
        f"indusfactory datasets gc --factory-root {plan.root} --keep {keep} --grace-hours {grace_hours:g} "
        f"--delete {plan.token}"
    )


def main() -> None:  # pragma: no cover - console entry point
    """The console script: the app, and once a run was stopped by a signal, an exit that does not wait for
    the interpreter to tear down torch and Prefect (tens of seconds on a loaded machine): by then the run
    has released its locks, stopped its temporary Prefect API and said how to resume."""
    from indusfactory.infra import stopping

    try:
        app()
    except SystemExit as exc:
        if not stopping.stop_requested():
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
