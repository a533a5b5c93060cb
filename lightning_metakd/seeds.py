"""Seeds: run a config once per training seed, then mean ± sd over seeds beside each run's CI.

A run's ``test/acc_ci95`` says how precisely its fixed test episodes pin *that run's* accuracy;
it says nothing about how much the accuracy moves when the model is initialised and trained
again. That spread — the seed-to-seed standard deviation — is what decides whether a
distillation gain survives a rerun, so tables of methods report both (e.g. Chen et al. 2019, "A
Closer Look at Few-shot Classification", re-ran every method; Bouthillier et al. 2021 on
variance in benchmarks).

A seed here changes what training does and nothing the test measures:

- ``seed_everything: s`` — the model's initialisation (and any other torch/NumPy randomness);
- ``data.init_args.train_seed: s`` — the training episodes
  (:class:`~lightning_metakd.data.EpisodicDataModule`'s ``train_seed``);
- the data's ``seed`` stays as configured: the class split and the fixed validation and test
  episodes are the same in every run, so runs of one config, and runs of two configs with the
  same data, answer the same test episodes. :func:`~lightning_metakd.seed_statistics.
  paired_over_seeds` uses that to take the *paired* per-episode difference of two configs
  (:func:`lightning_metakd.report.compare`) seed by seed, then its mean ± sd over seeds.

Each run is ``metakd fit`` then ``test`` of the best checkpoint in a subprocess of its own (a
crash, a leak or global state of one run cannot touch the next), in ``<out>/seed_<s>/`` with the
layout of a pipeline stage: ``stage_config.yaml``, the resolved ``config.yaml``, checkpoints,
TensorBoard events, ``log.txt`` (the run's output) and, once it has finished, ``done.json``. A
seed whose ``done.json`` is there for the same config is skipped when the sweep runs again.

Example (Python, e.g. a distillation study)::

    from lightning_metakd.seeds import run_seeds, paired_over_seeds, sweep_table
    overrides = {"data.init_args.root": "~/data/omniglot", "trainer.max_epochs": 5}
    baseline = run_seeds("configs/omniglot/protonet_5way_1shot.yaml", [0, 1, 2], "runs/s/base",
                         overrides={**overrides, "model.init_args.backbone.init_args.hidden": 16},
                         name="Conv4-16")
    distilled = run_seeds("configs/omniglot/distill_protonet.yaml", [0, 1, 2], "runs/s/kd",
                          overrides=overrides, name="Conv4-16 distilled")
    print(sweep_table([baseline, distilled]))
    print(paired_over_seeds(baseline, distilled, "runs/s/paired")["summary"])

Command::

    metakd sweep --config configs/kanji/protonet.yaml --seeds 0 1 2 --set trainer.max_epochs=2
    metakd sweep --config base=student.yaml --config kd=distill.yaml --set kd:model.init_args.teacher=t.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from lightning_metakd.pipeline.config import (
    MARKER,
    PipelineConfigError,
    PipelineSpec,
    StageSpec,
    _digest,
    _read_yaml,
    expand_dotted,
    merge_config,
    stage_config,
)
from lightning_metakd.pipeline.run import read_marker, write_json_atomic
from lightning_metakd.seed_statistics import (
    SeedRun,
    SeedRuns,
    mean_sd,
    paired_over_seeds,
    paired_table,
    sweep_table,
)

#: The log of each run's subprocess, beside its ``done.json``.
LOG = "log.txt"


def seed_overrides(seed: int) -> dict[str, Any]:
    """What a seed sets: the initialisation (``seed_everything``) and the training episodes.

    Example:
        >>> seed_overrides(3)
        {'seed_everything': 3, 'data': {'init_args': {'train_seed': 3}}}
    """
    return {"seed_everything": seed, "data": {"init_args": {"train_seed": seed}}}


def run_config(seed: int, config: str | Path, out_dir: Path, overrides: Mapping[str, Any]) -> dict:
    """The LightningCLI config of one seed's run: the YAML, ``overrides``, the seed, the folders.

    Built as a pipeline stage's (:func:`~lightning_metakd.pipeline.stage_config`): the logger and
    checkpoints write into ``<out_dir>/seed_<seed>/``.
    """
    name = f"seed_{seed}"
    stages = {name: StageSpec(Path(config), expand_dotted(overrides))}
    spec = PipelineSpec(name=name, run_dir=out_dir, stages=stages)
    # The seed comes last, so that no override undoes it.
    return merge_config(stage_config(spec, name), seed_overrides(seed))


def _child_env() -> dict[str, str]:
    """The environment of a run's subprocess: this one, with this package first on the path."""
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def run_one(run_dir: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Fit and test the ``stage_config.yaml`` of ``run_dir`` in this process; write ``done.json``."""
    from lightning_metakd.pipeline.stages import run_training_stage

    began = time.perf_counter()
    config = _read_yaml(run_dir / "stage_config.yaml", "The run's config")
    result = run_training_stage(run_dir.name, config, run_dir)
    marker = {
        **fields,
        "seconds": round(time.perf_counter() - began, 1),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result,
    }
    write_json_atomic(run_dir / MARKER, marker)
    return marker


def _run_in_subprocess(run_dir: Path, fields: Mapping[str, Any]) -> None:
    command = [sys.executable, "-m", "lightning_metakd.seeds", "--run", str(run_dir),
               "--fields", json.dumps(dict(fields))]  # fmt: skip
    with open(run_dir / LOG, "wb") as log:
        code = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), check=False
        ).returncode
    if code != 0:
        tail = (run_dir / LOG).read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(
            f"the run in {run_dir} failed (exit status {code}); the end of {run_dir / LOG}:\n"
            + "\n".join(tail)
        )


def run_seeds(
    config: str | Path,
    seeds: Sequence[int],
    out_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    force: bool = False,
    isolate: bool = True,
    echo: Callable[[str], None] | None = None,
    finished_only: bool = False,
) -> SeedRuns:
    """Fit and test ``config`` once per seed; returns the runs (:meth:`SeedRuns.summary`).

    Writes ``<out_dir>/seed_<s>/`` per seed (see the module docstring) and ``<out_dir>/seeds.json``
    (the runs and their mean ± sd). Resumable: a seed whose ``done.json`` holds the same config
    (``inputs``: a digest of the run's whole LightningCLI config) is kept.

    Args:
        config: a LightningCLI YAML (``metakd fit --config``).
        seeds: the training seeds (:func:`seed_overrides`), e.g. ``[0, 1, 2]``.
        out_dir: the sweep's folder.
        overrides: dotted or nested config keys for every run, e.g.
            ``{"trainer.max_epochs": 2, "data.init_args.root": "~/data/omniglot"}``.
        name: how tables name this config (default: the config file's stem).
        force: rerun every seed.
        isolate: each run in a subprocess of its own (default); ``False`` runs them in this
            process (faster to start; tests, debugging).
        echo: where progress lines go (default: print, flushed).
        finished_only: train nothing: every seed must have finished with this config, else
            :class:`FileNotFoundError` names the first that has not (its folder is left as it is).
    """
    say = echo or (lambda line: print(line, flush=True))
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, at least one; got {seeds}.")
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"No config at {config}; pass a `metakd fit` YAML.")
    out = Path(out_dir).expanduser().resolve()
    overrides = dict(overrides or {})
    result = SeedRuns(name or config.stem, config, out, overrides)
    for index, seed in enumerate(seeds, start=1):
        stage, run_dir = f"seed_{seed}", out / f"seed_{seed}"
        lightning_config = run_config(seed, config, out, overrides)
        inputs = _digest(lightning_config)
        marker = read_marker(out, stage)
        where = f"[sweep] {result.name}: seed {seed} ({index}/{len(seeds)})"
        if marker is not None and marker.get("inputs") == inputs and not force:
            say(f"{where} skipped (finished; {MARKER})")
        elif finished_only:
            state = "missing" if marker is None else "for another config"
            raise FileNotFoundError(f"{result.name}: seed {seed} has no finished run with this "
                                    f"config in {run_dir} ({MARKER} {state}); nothing is trained.")  # fmt: skip
        else:
            say(f"{where} running in {run_dir}")
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a half-written or outdated run starts clean
            run_dir.mkdir(parents=True)
            (run_dir / "stage_config.yaml").write_text(
                yaml.safe_dump(lightning_config, sort_keys=False)
            )
            fields = {"stage": stage, "seed": seed, "inputs": inputs}
            if isolate:
                _run_in_subprocess(run_dir, fields)
            else:
                run_one(run_dir, fields)
            marker = read_marker(out, stage)
            if marker is None:
                raise RuntimeError(f"the run in {run_dir} finished without writing {MARKER}.")
            say(f"{where} done in {marker['seconds']:.0f} s: {_accuracy(marker)}")
        result.runs.append(SeedRun(seed, run_dir, marker))
    write_json_atomic(out / "seeds.json", result.to_json())
    return result


def _accuracy(marker: Mapping[str, Any]) -> str:
    test = marker.get("test", {})
    return f"test/acc {100 * test['test/acc']:.2f} ± {100 * test.get('test/acc_ci95', 0):.2f}%"


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["trainer.max_epochs=2", ...]`` → ``{"trainer.max_epochs": 2}`` (values read as YAML).

    Example:
        >>> parse_sets(["trainer.max_epochs=2", "data.init_args.root=~/data/omniglot"])
        {'trainer.max_epochs': 2, 'data.init_args.root': '~/data/omniglot'}
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. --set trainer.max_epochs=2.")
        out[key] = yaml.safe_load(value)
    return out


def config_overrides(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--set [NAME:]KEY=VALUE`` items → ``{config name: overrides}``; no ``NAME:``: every config.

    Example:
        >>> config_overrides(["trainer.max_epochs=2", "kd:model.init_args.teacher=t.ckpt"],
        ...                  ["base", "kd"])
        {'base': {'trainer.max_epochs': 2}, 'kd': {'trainer.max_epochs': 2, 'model.init_args.teacher': 't.ckpt'}}
    """
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in items:
        name, colon, rest = item.partition(":")
        if colon and "=" not in name:
            if name not in out:
                raise ValueError(
                    f"--set {item!r}: {name!r} is not one of the configs {list(names)}."
                )
            out[name].update(parse_sets([rest]))
        else:
            for overrides in out.values():
                overrides.update(parse_sets([item]))
    return out


def sweep_main(argv: list[str]) -> int:
    """``metakd sweep``: every ``--config`` once per seed, mean ± sd, paired Δ vs the first."""
    from lightning_metakd.command_errors import fail
    from lightning_metakd.command_line import sweep_parser

    opts = sweep_parser().parse_args(argv)
    try:
        entries = []
        for spec in opts.config:
            name, sep, path = spec.partition("=")
            name, path = (name, path) if sep else (Path(spec).stem, spec)
            entries.append((name, Path(path)))
        names = [name for name, _ in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"two configs are named alike ({names}); name them NAME=YAML.")
        overrides = config_overrides(opts.set, names)
        out = Path(opts.out or Path("runs") / "sweep" / names[0])
        results = [
            run_seeds(path, opts.seeds, out / name, overrides[name], name=name, force=opts.force)
            for name, path in entries
        ]
        paired = [paired_over_seeds(results[0], r, out / "paired" / r.name) for r in results[1:]]
    except (OSError, ValueError, RuntimeError, PipelineConfigError) as err:
        return fail("metakd sweep", err)
    table = sweep_table(results) + ("\n" + paired_table(paired) if paired else "")
    write_json_atomic(
        out / "sweep.json", {"runs": [r.to_json() for r in results], "paired": paired}
    )
    (out / "sweep.md").write_text(table)
    print(table, end="")
    print(f"written {out / 'sweep.json'}, sweep.md")
    return 0


def _worker_main(argv: list[str]) -> int:
    """``python -m lightning_metakd.seeds --run <run_dir> --fields <json>``: one run (internal)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_metakd.seeds")
    parser.add_argument("--run", required=True)
    parser.add_argument("--fields", required=True)
    opts = parser.parse_args(argv)
    run_one(Path(opts.run), json.loads(opts.fields))
    return 0


__all__ = [
    "SeedRun",
    "SeedRuns",
    "config_overrides",
    "mean_sd",
    "paired_over_seeds",
    "paired_table",
    "parse_sets",
    "run_config",
    "run_one",
    "run_seeds",
    "seed_overrides",
    "sweep_main",
    "sweep_table",
]

if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
