"""``infkit run``: a whole analysis from a checked configuration, written to a workdir.

:func:`run` builds the model, data and task from the config's factories, fits (or reloads) the
influence, answers the questions the config asks (explanations by the estimator and by
RelatIF, self-influence and detection, group removal, a leave-one-out retraining check,
per-layer and per-token scores) and writes the workdir (docs/report.md §3):

* ``config.toml`` (a copy) and ``settings.json`` (every key, defaults filled in);
* ``influence/``: the fitted influence (:meth:`infkit.Influence.save`), reloaded by the next
  run on the same model, data and settings;
* ``report-*/``: one artifact (identity, checksums, manifest) with ``scores.safetensors``
  (the queries' scores by the estimator and RelatIF, self-influence, losses, per-layer shares)
  and ``report.json`` (everything the page shows), from which ``infkit report`` rebuilds it;
* CSV tables (``top_k.csv``, ``self_influence.csv``, ``group_removal.csv``, ``loo.csv``,
  ``layers.csv``) and ``report.html``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from infkit import evaluate
from infkit import retrain as retraining
from infkit._version import __version__
from infkit.data import ExampleSet, checked_indices
from infkit.errors import (
    ArtifactError,
    ConfigError,
    CurvatureError,
    InfkitError,
    NotConvergedWarning,
    Notice,
    UnsupportedError,
    shown_warnings,
    warn,
)
from infkit.fingerprint import (
    data_fingerprint,
    holds_module,
    model_fingerprint,
    task_fingerprint,
)
from infkit.fitted import check_beside
from infkit.gradients import PerExample
from infkit.influence import Influence, TopK, solves_by_iterations
from infkit.methods import method_class
from infkit.parameters import ParameterSpace
from infkit.progress import Stopwatch
from infkit.report import factories, lock
from infkit.report.config import MIN_RETRAININGS, RunConfig
from infkit.report.views import (
    Display,
    far_reading,
    guess_kind,
    retraining_name,
    value_range,
    worst_norm,
)
from infkit.saved import KIND as SAVED_KIND
from infkit.store import STORE_TEMPORARY, ArtifactStore, differences, save_csv, save_json
from infkit.task import MARGINS, Task, unwrapped

#: the artifact kind of a run's results
KIND = "report"
SAVED = "influence"
#: where a method that keeps artifacts commits them while the run computes (its factors, its
#: score shards), so that a killed run resumes there; removed when the run has finished
PARTIAL = "infkit-partial"  # (a name of the tool's: a reviewer's project had a partial/)
#: where a run writes its configuration, tables and page before moving them into the workdir
STAGING = ".infkit-outputs"
#: the artifact in ``infkit-partial/`` that says whose work it holds (:func:`_prepare_partial`)
PARTIAL_KIND = "partial-run"
#: the store kind of the warnings the fit of the saved influence gave
FIT_WARNINGS = "fit-warnings"


# ---------------------------------------------------------------------------- inputs
def _resolve_factories(config: RunConfig) -> None:
    """Find the module and the first name of every function the configuration names before
    calling any (docs/report.md §2: a missing one stops before any computation; a tester's
    missing [data] factory or decode was found only after the model factory had built and
    trained the model). The rest of a dotted name is looked up where it is used: a factory may
    set it (``tokenizer.decode`` of a module's ``tokenizer = None``)."""
    d = config["data"]
    named = [
        (config["model"]["factory"], "[model] factory"),
        (d["factory"], "[data] factory"),
        (d["display"], "[data] display"),
        (d["decode"], "[data] decode"),
        (config["task"]["factory"], "[task] factory"),
        (config["self_influence"]["flagged"], "[self_influence] flagged"),
    ]
    for spec, key in named:
        if isinstance(spec, str) and spec:
            factories.resolve(spec, key, config.folder, first_only=True)


def build_model(config: RunConfig) -> nn.Module:
    """The trained model from ``[model] factory``."""
    section = config["model"]
    model = factories.call(section["factory"], "[model] factory", config.folder, **section["args"])
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"[model] factory = {section['factory']!r} returned {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return model


def build_data(config: RunConfig) -> tuple[ExampleSet, ExampleSet]:
    """The (train, test) example sets from ``[data] factory``."""
    section = config["data"]
    data = factories.call(section["factory"], "[data] factory", config.folder, **section["args"])
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ConfigError(
            f"[data] factory = {section['factory']!r} must return (train, test), got "
            f"{type(data).__name__}"
            + (f" of length {len(data)}" if hasattr(data, "__len__") else "")
        )
    try:
        return ExampleSet(data[0], name="training set"), ExampleSet(data[1], name="test set")
    except InfkitError as error:
        raise ConfigError(f"[data] factory = {section['factory']!r}: {error}") from error


def build_task(config: RunConfig, model: nn.Module) -> Task:
    """The task: ``[task] factory``, or the constructor ``[task] kind`` names."""
    section = config["task"]
    if section["factory"]:
        task = factories.call(section["factory"], "[task] factory", config.folder, model)
        if not isinstance(task, Task):
            raise ConfigError(
                f"[task] factory = {section['factory']!r} returned {type(task).__name__}, not an "
                "infkit.Task"
            )
        # (a tester's factory built its Task around another trained model: every number on
        # the page was that model's, with nothing said)
        if not holds_module(task.model, unwrapped(model)):  # (a task reads through wrappers)
            raise ConfigError(
                f"[task] factory = {section['factory']!r} returned a Task around a model that is "
                "not the one [model] factory built (nor holds it as a module): build the Task "
                "around the model it is given as its argument"
            )
        return task
    kind, measurement = section["kind"], section["measurement"]
    try:
        if kind in ("classification", "binary_classification"):
            return getattr(Task, kind)(model, measurement=measurement)
        if measurement != "loss":
            raise ConfigError(
                f"[task] measurement = {measurement!r}: kind {kind!r} measures the loss"
            )
        return getattr(Task, kind)(model)
    except ConfigError:
        raise
    except InfkitError as error:
        raise ConfigError(f"[task]: {error}") from error


def measurement_name(task: Task) -> str:
    """What the task's scores measure, as the page names it: ``"loss"``, ``"margin"`` (the
    ready-made classifiers'), or a function's name."""
    fn = task.measurement
    if task.measures_loss or fn is None:  # (the task's loss, under its own function's name)
        return "loss"
    if fn in MARGINS:
        return "margin"
    return str(getattr(fn, "__qualname__", getattr(fn, "__name__", type(fn).__name__)))


def build_influence(config: RunConfig, task: Task, partial: Path | None = None) -> Influence:
    """An unfitted Influence with the ``[influence]`` settings (checked at construction),
    committing what it computes to ``partial`` (:func:`resumable_in`)."""
    s = config["influence"]
    try:
        where = resumable_in(s["method"], s["options"], partial)
        place: dict[str, Any] = {} if where is None else {"workdir": where}
        return Influence(
            task,
            s["method"],
            s["estimator"],
            l2=s["l2"],
            damping=s["damping"],
            relatif=s["relatif"],
            batch_size=s["batch_size"],
            checks=s["checks"],
            **place,
            **s["options"],
        )
    except InfkitError as error:
        raise ConfigError(f"{config.path.name}: [influence]: {error}") from error


def resumable_in(method: str, options: dict[str, Any], partial: Path | None) -> Path | None:
    """``partial`` where the method commits its work as it goes (the Kronecker methods' and
    ASTRA's factors, streamed score shards: a run killed in its fit or scores resumes there,
    where ``influence/`` is saved only once the fit is done) and the options name no place of
    their own (``workdir``, ``factors_dir``); else None."""
    if partial is None or method == "auto" or _names_a_place(options):
        return None
    kind = method_class(method)
    return partial if kind.shards_scores or "factors_dir" in kind.Options.names() else None


def build_display(config: RunConfig, train: ExampleSet, test: ExampleSet) -> Display:
    """How the report shows examples (``[data] kind``, ``display``, ``decode``, names)."""
    d = config["data"]
    items = None
    if d["display"]:
        shown = factories.call(d["display"], "[data] display", config.folder, **d["args"])
        if not isinstance(shown, (tuple, list)) or len(shown) != 2:
            raise ConfigError(
                f"[data] display = {d['display']!r} must return (train_items, test_items)"
            )
        for name, part, examples in (("train", shown[0], train), ("test", shown[1], test)):
            if len(part) != len(examples):
                raise ConfigError(
                    f"[data] display = {d['display']!r}: {len(part)} {name} items for "
                    f"{len(examples)} {name} examples"
                )
        items = {"train": shown[0], "test": shown[1]}
    decode: Callable[[list[int]], Sequence[str]] | None = None
    if d["decode"]:
        decode = factories.resolve(d["decode"], "[data] decode", config.folder)
    if d["image_shape"] and items is None:  # (a tester's [3, 3] for 4 features drew a table)
        sample = train.take([0]).inputs
        numbers = sample[0].numel() if isinstance(sample, Tensor) else None
        wanted = math.prod(d["image_shape"])
        if numbers != wanted:
            held = "inputs that are no single tensor" if numbers is None else f"{numbers} numbers"
            raise ConfigError(
                f"{config.path.name}: [data] image_shape = {list(d['image_shape'])} holds "
                f"{wanted} numbers, and the "
                f"training set's examples hold {held}: give the shape of one example's inputs, "
                "or leave it out"
            )
    kind = d["kind"]
    if kind == "auto":
        if items is not None:
            kind = "text" if isinstance(items["train"][0], str) else "image"
        else:
            sample = train.take([0]).inputs
            first = sample[0] if isinstance(sample, Tensor) else sample
            kind = guess_kind(first, config["task"]["kind"], d["image_shape"])
    _check_names(d["class_names"], d["feature_names"], kind, train, test)
    return Display(
        kind,
        train,
        test,
        items=items,
        image_shape=tuple(d["image_shape"]),
        decode=decode,
        class_names=d["class_names"],
        feature_names=d["feature_names"],
    )


def _check_names(
    class_names: Sequence[str],
    feature_names: Sequence[str],
    kind: str,
    train: ExampleSet,
    test: ExampleSet,
) -> None:
    """Refuse ``[data] class_names`` that do not name every class the labels hold, and
    ``feature_names`` that are not one per feature of a tabular example (a tester's: one name
    for two classes showed the second as "1" on the page, without a word)."""
    if feature_names and kind == "tabular":
        first = train.take([0]).inputs
        if not isinstance(first, Tensor):
            raise ConfigError(
                f"[data] feature_names name the features of tensor inputs, one row per example, "
                f"but the inputs are {type(first).__name__}"
                + (f" of {sorted(map(str, first))}" if isinstance(first, dict) else "")
                + ": leave feature_names out (or kind = 'auto' for token ids)"
            )
        if first[0].numel() != len(feature_names):
            raise ConfigError(
                f"[data] feature_names has {len(feature_names)} names for "
                f"{first[0].numel()} features per example: give one name per feature"
            )
    if not class_names:
        return
    for name, examples in (("training", train), ("test", test)):
        for batch in examples.batches(4096):
            labels = batch.targets
            if not isinstance(labels, Tensor) or labels.is_floating_point() or not labels.numel():
                return  # not class indices: nothing to name
            largest = int(labels.max())
            if largest >= len(class_names):
                raise ConfigError(
                    f"[data] class_names has {len(class_names)} names, but the {name} labels "
                    f"hold class {largest}: give a name for every class (classes 0 to "
                    f"{largest} at least)"
                )


# ---------------------------------------------------------------------------- helpers
def per_example(task: Task, examples: ExampleSet, which: str, batch_size: int) -> Tensor:
    """Per-example losses, measurements or outputs of the model, without gradients."""
    engine = PerExample(task, ParameterSpace(task.model))
    fn = {"loss": engine.losses, "measurement": engine.measurements, "outputs": engine.outputs}
    with torch.no_grad():
        parts = [fn[which](batch).detach() for batch in examples.batches(batch_size)]
    return torch.cat([p.reshape(p.shape[0], -1) if which == "outputs" else p for p in parts])


def _check_class_count(task: Task, test: ExampleSet, class_names: Sequence[str]) -> None:
    """Refuse ``[data] class_names`` other than two for a binary classifier, or fewer than the
    classification model has outputs (a class it predicts would show as a number), from one
    test example, before the fit."""
    if class_names and task.name == "binary_classification" and len(class_names) != 2:
        # (one name or three were taken, and the page showed labels 0 and 1 as numbers)
        raise ConfigError(
            f"[data] class_names has {len(class_names)} name(s), but a binary classifier has "
            "two classes, labels 0 and 1: give two names, the first for label 0"
        )
    if not class_names or task.name != "classification":
        return
    classes = per_example(task, test.part([0]), "outputs", 1).shape[-1]
    if classes > len(class_names):
        raise ConfigError(
            f"[data] class_names has {len(class_names)} names for the model's {classes} "
            "classes: give a name for every class it can predict"
        )


def predictions(
    task: Task, examples: ExampleSet, batch_size: int, class_names: Sequence[str]
) -> list[str] | None:
    """What the model predicts for each example, as text: the class (by name when given) for
    the classification tasks, the output values for regression; None otherwise."""
    if task.name not in ("classification", "binary_classification", "regression"):
        return None
    outputs = per_example(task, examples, "outputs", batch_size)
    if task.name == "regression":
        return [", ".join(f"{v:.4g}" for v in row.tolist()[:4]) for row in outputs]
    classes = (
        (outputs.reshape(-1) > 0).long().tolist()
        if task.name == "binary_classification"
        else outputs.argmax(-1).tolist()
    )
    return [class_names[c] if c < len(class_names) else str(c) for c in classes]


def fit_or_reload(
    inf: Influence, config: RunConfig, train: ExampleSet, workdir: Path
) -> tuple[Influence, str, list[dict[str, str]]]:
    """Reload the influence saved in the workdir when it belongs to this model, data and
    settings; otherwise fit and save. Returns the influence, how it was obtained, and the
    warnings its saved fit gave (:func:`saved_fit_warnings`; none for a fit now, whose own
    are shown as it runs)."""
    saved = workdir / SAVED
    reuse = config["influence"]["reuse"]
    # (before a reload too: its scores commit their shards there)
    _prepare_partial(inf, train, reuse, own_partial(inf, config, workdir))
    if reuse and saved.is_dir() and not ArtifactStore(saved).committed(SAVED_KIND):
        warn(  # the library's own message would advise inf.save(path)
            f"not reusing {saved}: it holds no complete saved influence (a run stopped before its "
            "save was committed leaves it so); fitting again",
            Notice,
        )
    elif reuse and saved.exists():
        try:
            # (scoring commits its shards where this run's influence would: a kill resumes)
            loaded = Influence.load(saved, inf.task, train, checks=inf.checks, workdir=inf.workdir)
        except ArtifactError as error:  # (its cause: the library's remedy is not the run's)
            warn(
                f"not reusing the saved influence in {saved}: {error.cause}; fitting again", Notice
            )
        else:
            changed = setting_changes(loaded, inf)
            if changed:
                warn(
                    f"the influence saved in {saved} was fitted with other settings ("
                    + "; ".join(changed)
                    + "); fitting again with the config's ([influence] reuse = false always "
                    "refits)",
                    Notice,
                )
            else:
                try:
                    said = saved_fit_warnings(loaded, train, workdir)
                    warn(  # (a tester's rerun said nothing of the fit it reused)
                        f"reusing the influence saved in {saved}, fitted by an earlier run of "
                        "the same model, data and settings ([influence] reuse = false refits)",
                        Notice,
                    )
                    return loaded, "reloaded", said
                except ArtifactError as error:
                    # (as a damaged save: fitted again, where it stopped the run with status 2)
                    warn(
                        f"not reusing the saved influence in {saved}: the record of its fit's "
                        f"warnings is damaged ({error.cause}); fitting again",
                        Notice,
                    )
    with shown_warnings() as said:  # the fit's own (also shown and recorded by the run)
        try:
            inf.fit(train)
        except InfkitError as error:
            raise type(error)(f"fitting the influence: {error}") from error
    # saved with no workdir: infkit-partial/ goes with the run (a rerun that reloads gives its own;
    # a library load of influence/ had scored into the removed, or another machine's, path)
    inf.save(saved, overwrite=True, keep_workdir=False)
    keep_fit_warnings(inf, train, workdir, said)
    return inf, "fitted", []


def own_partial(inf: Influence, config: RunConfig, workdir: Path) -> Path | None:
    """The run's own ``infkit-partial/`` where ``inf`` commits its work (:func:`resumable_in`), or
    None: a method that commits nothing, or options that name a place of their own, which the
    run never empties."""
    expected = workdir / PARTIAL
    placed = _names_a_place(config["influence"]["options"])
    return expected if inf.workdir == expected and not placed else None


#: the ``[influence] options`` that name a place of the user's own, which a run never empties
PLACE_OPTIONS = ("workdir", "factors_dir")


def _names_a_place(options: dict[str, Any]) -> bool:
    """Whether ``options`` name a place of their own (:data:`PLACE_OPTIONS`)."""
    return any(key in options for key in PLACE_OPTIONS)


def _prepare_partial(inf: Influence, train: ExampleSet, reuse: bool, partial: Path | None) -> None:
    """Keep the run's own ``infkit-partial/`` (:func:`own_partial`) for a fit of this model, task,
    data and settings, which resumes from what a stopped run committed there; empty it
    otherwise (said in a Notice where a stopped run of another left work there), and with
    ``reuse`` off. The identity it holds is kept in it, so that a killed fit's factors are
    never read by a fit of another config or data. A folder of that name that infkit did not
    write (:func:`_runs_own`) is refused, never emptied."""
    if partial is None:
        return
    if partial.is_dir() and not _runs_own(partial):
        raise ConfigError(
            f"{partial} holds files infkit did not write ({', '.join(_listed(partial))}): a run "
            f"keeps its work in progress there and empties it. Move them, or run with another "
            "workdir (--out)"
        )
    identity = {
        "infkit": __version__,
        "settings": influence_settings(inf),
        "model": model_fingerprint(inf.task.model),
        "task": task_fingerprint(inf.task),
        "train": data_fingerprint(train),
    }
    store = ArtifactStore(partial)
    if reuse and partial.is_dir():
        try:
            if store.load(PARTIAL_KIND, identity) is not None:
                return  # (its work is this fit's: resumed)
        except ArtifactError:
            pass  # (damaged: emptied below)
        others = store.others(PARTIAL_KIND, identity)
        if others or any(partial.iterdir()):
            changed = ", ".join(differences(identity, others[0][1])) if others else "unknown"
            warn(
                f"not resuming from {partial}: it holds what a stopped run of another model, "
                f"task, data or settings committed (differs in: {changed}); removed",
                Notice,
            )
    remove_partial(partial)
    store.save(PARTIAL_KIND, identity, documents={"run": {"note": "a run's work, kept to resume"}})


def _runs_own(partial: Path) -> bool:
    """Whether ``partial`` is a run's: it holds the record :func:`_prepare_partial` writes
    first, or nothing but the store's temporary entries (a run killed while it wrote that
    record), or nothing (a reviewer's ``.gitkeep`` and ``.git/`` were not a run's)."""
    names = [p.name for p in partial.iterdir()]
    return any(n.startswith(f"{PARTIAL_KIND}-") for n in names) or all(
        n.startswith(STORE_TEMPORARY) or (n.startswith(".") and n.endswith(".tmp")) for n in names
    )


def _listed(folder: Path, most: int = 3) -> list[str]:
    """The first ``most`` entries of ``folder`` by name, and how many more."""
    names = sorted(p.name for p in folder.iterdir())
    return names[:most] + ([f"{len(names) - most} more"] if len(names) > most else [])


def remove_partial(partial: Path) -> None:
    """Remove a run's ``infkit-partial/`` (:func:`_runs_own`; a folder of that name infkit did not
    write is left alone)."""
    if partial.is_dir() and _runs_own(partial):
        shutil.rmtree(partial, ignore_errors=True)


def _fit_identity(inf: Influence, train: ExampleSet) -> dict[str, Any]:
    """What the fit's warnings belong to: the saved influence's settings, model and data."""
    return {
        "settings": influence_settings(inf),
        "model": model_fingerprint(inf.task.model)["parameters"],
        "train": data_fingerprint(train),
    }


def keep_fit_warnings(
    inf: Influence, train: ExampleSet, workdir: Path, said: list[dict[str, str]]
) -> None:
    """Keep the warnings the fit gave (``said``) with the saved influence, in the workdir's
    store (those of earlier fits removed): a run that reloads it lists them
    (:func:`saved_fit_warnings`), since the fit does not run again to give them."""
    store = ArtifactStore(workdir)
    identity = _fit_identity(inf, train)
    store.save(FIT_WARNINGS, identity, documents={"warnings": said}, overwrite=True)
    for path, _ in store.others(FIT_WARNINGS, identity):
        store.remove(path)


def saved_fit_warnings(inf: Influence, train: ExampleSet, workdir: Path) -> list[dict[str, str]]:
    """The warnings the fit of the reloaded influence gave, marked ``"from": "the saved fit"``
    (none for a workdir from before they were kept)."""
    saved = ArtifactStore(workdir).load(FIT_WARNINGS, _fit_identity(inf, train))
    if saved is None:
        return []
    return [{**w, "from": "the saved fit"} for w in saved.json("warnings")]


def influence_settings(inf: Influence) -> dict[str, Any]:
    """The settings a saved influence must share with the config's to be reused, by the names
    of their ``[influence]`` keys."""
    return {
        "method": inf.method_name,
        "estimator": inf.estimator,
        "relatif": inf.relatif,
        "l2": inf.l2,
        "damping": "auto" if inf.auto_damping else inf.damping,
        "batch_size": inf.batch_size,
        "options": inf.method_options,
    }


def setting_changes(saved: Influence, wanted: Influence) -> list[str]:
    """Each setting in which the saved influence differs from the wanted one, as
    ``"damping: 0.01 saved, 0.001 now"``; empty when it can be reused."""
    old, new = influence_settings(saved), influence_settings(wanted)
    return [
        f"{path}: {_at(old, path)} saved, {_at(new, path)} now" for path in differences(old, new)
    ]


def _at(settings: dict[str, Any], path: str) -> str:
    """The value at a dotted path of ``settings`` as text (``unset`` where it is missing)."""
    value: Any = settings
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return "unset"
        value = value[part]
    return repr(value)


def _flagged(config: RunConfig, n: int) -> Tensor | None:
    spec = config["self_influence"]["flagged"]
    if isinstance(spec, str):
        spec = factories.call(spec, "[self_influence] flagged", config.folder)
    if spec is None or len(spec) == 0:
        return None
    try:
        idx = checked_indices(spec, n, what="[self_influence] flagged index", unique=True)
    except InfkitError as error:
        raise ConfigError(f"{config.path.name}: {error}") from error
    if len(idx) == n:  # (a tester's run then showed no detection and said nothing)
        raise ConfigError(
            f"{config.path.name}: [self_influence] flagged names every one of the {n} training "
            "examples: a detection AUC ranks the flagged against the others, so it needs both; "
            "flag the known-bad examples only"
        )
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


def _checked_groups(config: RunConfig, n: int) -> dict[str, Tensor]:
    """``[group_removal] groups``, each a list of distinct training indices in range, else a
    ConfigError naming the file and the group (before any fitting)."""
    out = {}
    for name, members in config["group_removal"]["groups"].items():
        if not name.strip():  # (a tester's "" named rows of the page and the CSV blank)
            raise ConfigError(
                f"{config.path.name}: [group_removal] groups has a group with an empty name "
                f"({name!r}): name each group, as the page and group_removal.csv show it"
            )
        try:
            out[name] = checked_indices(
                members, n, what=f"[group_removal] groups.{name} index", unique=True
            )
        except InfkitError as error:
            raise ConfigError(f"{config.path.name}: {error}") from error
        if len(out[name]) == n:  # (a tester's was refused after the fit, naming no key)
            raise ConfigError(
                f"{config.path.name}: [group_removal] groups.{name} holds every one of the "
                f"{n} training examples: removing them all leaves nothing to retrain on; "
                "give a group of some of them"
            )
    return out


# ---------------------------------------------------------------------------- the run
def run(config: RunConfig, out: str | Path | None = None, progress: bool | None = None) -> Path:
    """Run the analysis ``config`` describes; write the workdir and ``report.html``.

    Args:
        config: a checked configuration (:func:`infkit.report.config.parse`).
        out: the workdir, overriding ``[output] workdir``.
        progress: progress bars, as :class:`infkit.Influence` takes them.

    Returns:
        the path of ``report.html``.
    """
    workdir = config.workdir(out)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / lock.LOCK_NAME).touch()  # (one it cannot write in: /proc, read-only)
    except OSError as error:  # (a tester's /proc/nope/run, or a path under a file: a traceback)
        where = (
            "--out"
            if out is not None
            else "[output] workdir"
            if config["output"]["workdir"]
            else "the default workdir (set [output] workdir or --out)"
        )
        raise ConfigError(
            f"{where}: {workdir} cannot be created or written ({error.strerror or error}): "
            "name a directory you can write (created when missing) for the run's results"
        ) from error
    with lock.held(workdir), shown_warnings() as shown:
        return _run(config, workdir, progress, shown)


def _run(
    config: RunConfig, workdir: Path, progress: bool | None, shown: list[dict[str, str]]
) -> Path:
    """:func:`run` in ``workdir`` (made, its lock held), with ``shown`` the warnings shown so
    far (the page lists them)."""
    from infkit.report.html import write_report

    watch = Stopwatch()
    _resolve_factories(config)
    model = build_model(config)
    train, test = build_data(config)
    check_retraining_size(config, len(train))
    task = build_task(config, model)
    model = unwrapped(model)  # (the page names and fingerprints the model a task runs on)
    display = build_display(config, train, test)
    inf = build_influence(config, task, workdir / PARTIAL)
    inf.progress = progress
    rep = config["report"]
    chosen = chosen_queries(config, len(test))  # refused here, before any fitting
    flagged = _flagged(config, len(train))
    groups = _checked_groups(config, len(train))
    # the test set checked (and a language model's padding probed) once, as a whole, before
    # the fit: the queries, a subset of it, are not probed again
    check_beside(PerExample(task, ParameterSpace(task.model)), train, test)
    display.view("test", 0)  # a decode that does not fit the token ids, too
    _check_class_count(task, test, display.class_names)
    watch.lap("load")
    inf, origin, again = fit_or_reload(inf, config, train, workdir)
    for said in again:  # (on the console too: a tester's rerun said nothing there)
        print(f"{said['category']} (given by the saved fit): {said['message']}", file=sys.stderr)
    shown += again
    watch.lap("fit")

    batch = config["influence"]["batch_size"]
    test_losses = per_example(task, test, "loss", batch)
    if chosen is not None:
        queries = chosen
    else:
        queries = test_losses.argsort(descending=True)[: rep["n_queries"]]
    query_set = test.part(queries)
    k = min(rep["top_k"], len(train))
    _note_clamped(config, len(train), len(test))
    started = time.perf_counter()
    scores = inf.scores(query_set)
    queried = time.perf_counter() - started
    # the rankings of the scores at hand: top_k would solve for every query (RelatIF: every
    # training example) again
    top = TopK.of(scores, k, task.higher_is_better)
    relatif = inf.method.supplies("relatif") and inf.estimator != "relatif"
    si = config["self_influence"]
    self_influence = si["enabled"] and inf.method.answers("self_scores")
    asked = [n for n, on in (("RelatIF", relatif), ("self-influence", self_influence)) if on]
    iterative = solves_by_iterations(inf.method)
    # both from one solve per training example where the method solves by iterations
    shared = relatif and self_influence and inf._shares_solves(query_set)
    if asked and iterative:
        solves = 1 if shared else len(asked)
        _warn_solve_per_example(inf.method.name, asked, solves, len(train), len(queries), queried)
    together = inf.relatif_and_self_scores(query_set) if shared else None
    rel_scores: Tensor | None = None
    if together is not None:
        rel_scores = together[0]
    elif relatif:
        rel_scores = inf.with_estimator("relatif").scores(query_set)
    rel_top = TopK.of(rel_scores, k, task.higher_is_better) if rel_scores is not None else None
    watch.lap("explain")

    train_losses = per_example(task, train, "loss", batch)
    predicted = predictions(task, query_set, batch, display.class_names)
    tensors: dict[str, Tensor] = {
        "queries": queries,
        "scores": scores,
        "train_losses": train_losses,
        "query_losses": test_losses[queries],
    }
    if rel_scores is not None:
        tensors["relatif_scores"] = rel_scores
    if flagged is not None:
        tensors["flagged"] = flagged

    data: dict[str, Any] = {
        "title": rep["title"] or config.path.stem,
        "display_kind": display.kind,
        "origin": origin,
    }
    data["queries"] = _explanations(inf, display, queries, query_set, top, rel_top, predicted)
    watch.lap("views")

    # self-influence and detection
    if self_influence:
        self_scores = inf.self_scores() if together is None else together[1]
        tensors["self_scores"] = self_scores
        order = self_scores.argsort(descending=True)[: si["top"]].tolist()
        data["self_influence"] = {
            "rows": [
                {
                    "index": j,
                    "score": float(self_scores[j]),
                    "loss": float(train_losses[j]),
                    "label": display.label("train", j),
                    "target": display.label("train", j, exact=True),
                    "flagged": bool(flagged[j]) if flagged is not None else None,
                    "view": display.view("train", j),
                }
                for j in order
            ],
        }
        if flagged is not None and 0 < int(flagged.sum()) < len(flagged):
            data["self_influence"]["detection"] = {
                "self_influence_auc": evaluate.detection_auc(self_scores, flagged),
                "loss_auc": evaluate.detection_auc(train_losses, flagged),
                "n_flagged": int(flagged.sum()),
            }
        watch.lap("self_influence")

    # group removal
    if groups:
        data["groups"] = _groups(inf, groups, query_set, scores)
        watch.lap("group_removal")

    # leave-one-out retraining check on the first query
    n_loo = min(config["retraining"]["n"], len(train))
    if n_loo:
        data["retraining"] = _retraining(
            config, inf, train, query_set, scores, queries, tensors, workdir, progress
        )
        watch.lap("retraining")

    # per-layer shares of the score mass
    if config["layers"]["enabled"] and inf.method.answers("module_scores"):
        base = inf if inf.estimator == "if" else inf.with_estimator("if")
        parts = base.module_scores(query_set)
        mass = {name: float(part.abs().sum()) for name, part in parts.items()}
        total = sum(mass.values()) or 1.0
        # (a model that is one layer has the empty name: "(root)", as saved fits name it)
        data["layers"] = {name or "(root)": m / total for name, m in mass.items()}
        watch.lap("layers")

    data["summary"] = _summary(inf, model, train, test, origin, workdir)
    data["summary"]["seconds"] = watch.seconds
    data["warnings"] = shown
    store = ArtifactStore(workdir)
    identity = {
        "settings": config.record(),
        "model": model_fingerprint(model)["parameters"],
        "train": data_fingerprint(train),
        "test": data_fingerprint(test),
    }
    store.save(
        KIND, identity, tensors={"scores": tensors}, documents={"report": data}, overwrite=True
    )
    for path, _ in store.others(KIND, identity):  # one report per workdir: the latest
        store.remove(path)
    # the files beside the results, once they are committed, written whole in a folder of
    # their own and then moved in, one rename each: a run killed before (its page rendering
    # included: a tester's kill there left this run's tables beside the last run's page)
    # leaves the last finished run's configuration, tables and page together
    staging = workdir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shutil.copyfile(config.path, staging / "config.toml")
    save_json(staging / "settings.json", config.record())
    _write_tables(staging, data)
    write_report(workdir, out=staging / "report.html")
    # a section this run did not compute leaves no table of an earlier run beside its own (a
    # tester's rerun without retrainings kept the loo.csv of another model and data)
    for table in SECTION_TABLES.values():
        if not (staging / table).exists():
            (workdir / table).unlink(missing_ok=True)
    for written in sorted(staging.iterdir(), key=lambda p: p.name == "report.html"):
        os.replace(written, workdir / written.name)  # (the page last)
    staging.rmdir()
    page = workdir / "report.html"
    # the work committed for a resume is in influence/ and the results now (the factors, as
    # large as the model's layers, would stay beside them), whatever this run's method (a
    # stopped run's of another may be there), unless the options name that place
    options = config["influence"]["options"]
    places = [Path(options[key]).resolve() for key in PLACE_OPTIONS if key in options]
    if (workdir / PARTIAL).resolve() not in places:
        remove_partial(workdir / PARTIAL)
    return page


def _note_clamped(config: RunConfig, n_train: int, n_test: int) -> None:
    """Tell where ``[report] top_k`` or ``n_queries``, ``[self_influence] top`` or
    ``[retraining] n`` ask for more examples than there are (the run takes what there is)."""
    rep, si = config["report"], config["self_influence"]
    for section, key, asked, there, what in (
        ("report", "top_k", rep["top_k"], n_train, "training"),
        ("report", "n_queries", 0 if rep["queries"] else rep["n_queries"], n_test, "test"),
        ("self_influence", "top", si["top"] if si["enabled"] else 0, n_train, "training"),
        ("retraining", "n", config["retraining"]["n"], n_train, "training"),
    ):
        if asked > there:
            warn(
                f"{config.path.name}: [{section}] {key} = {asked}, but there are {there} {what} "
                f"examples: taking {there}",
                Notice,
            )


def chosen_queries(config: RunConfig, n_test: int) -> Tensor | None:
    """The test examples ``[report] queries`` names (None: the highest-loss ones are
    explained), each in range and named once, else a ConfigError."""
    named = config["report"]["queries"]
    if not named:
        return None
    try:
        return checked_indices(named, n_test, what="[report] queries index", unique=True)
    except InfkitError as error:
        raise ConfigError(f"{config.path.name}: {error}") from error


def check_retraining_size(config: RunConfig, n_train: int) -> None:
    """Refuse, before any fitting, a retraining check the training set is too small for: it
    makes min(n, N) retrainings and needs ``MIN_RETRAININGS`` of them to correlate."""
    n = config["retraining"]["n"]
    if n and n_train < MIN_RETRAININGS:
        raise ConfigError(
            f"{config.path.name}: [retraining] n = {n}, but the training set has only {n_train} "
            f"examples and the check needs at least {MIN_RETRAININGS} retrainings to correlate; "
            "set [retraining] n = 0"
        )


def _retraining(
    config: RunConfig,
    inf: Influence,
    train: ExampleSet,
    query_set: ExampleSet,
    scores: Tensor,
    queries: Tensor,
    tensors: dict[str, Tensor],
    workdir: Path,
    progress: bool | None,
) -> dict[str, Any]:
    """The leave-one-out check on the first query: retrain without each of the training
    examples with the largest |score|, correlate predicted with actual changes, and say
    (a warning, and the record the page shows) which retrainings did not converge, and which
    moved the parameters far beyond the estimator's step (:func:`moved_far`)."""
    section = config["retraining"]
    loo_idx = scores[0].abs().topk(min(section["n"], len(train))).indices
    with warnings.catch_warnings():  # said below, in the configuration's terms
        warnings.simplefilter("ignore", NotConvergedWarning)
        loo = retraining.leave_one_out(
            inf.task,
            train,
            query_set.part([0]),
            loo_idx,
            inf.l2,
            tolerance=section["tolerance"],
            max_iter=section["max_iter"],
            cache_dir=workdir / "retrain",
            progress=progress,
        )
    if loo.reused:  # (a tester's rerun said nothing of the work it reused)
        warn(
            f"{loo.reused} of the {len(loo_idx)} leave-one-out retrainings were read from "
            f"{workdir / 'retrain'}, computed by an earlier run with the same model, data, l2 "
            "and stopping rule (a retraining does not depend on the method or its options; "
            "delete that directory to compute them again)",
            Notice,
        )
    predicted, actual = scores[0, loo_idx], loo.measurement[0]
    tensors.update(loo_indices=loo_idx, loo_predicted=predicted, loo_actual=actual)
    stats = evaluate.correlation(predicted, actual)
    unconverged = not_converged(loo)
    late = {r["index"] for r in unconverged}
    if not loo.start_converged:  # the retraining on all the data the changes are measured from
        unconverged.append(
            {"index": None, "gradient_norm": loo.start_gradient_norm, "target": loo.start_target}
        )
    steps = parameter_steps(inf, loo)
    rows = [  # loo.csv, written with the run's other tables once its results are committed
        {
            "train_index": j,
            "predicted": float(p),
            "actual": float(a),
            "gradient_norm": float(g),
            "converged": j not in late,
            **(steps[k] if steps else {}),
        }
        for k, (j, p, a, g) in enumerate(
            zip(loo_idx.tolist(), predicted, actual, loo.gradient_norms)
        )
    ]
    # (unconverged ones too: a float32 model's retrainings, all stopped at its precision, hid
    # that they moved 6.7-8.9 times the step behind "raise max_iter", a tester's)
    far_rows = [k for k, r in enumerate(rows) if moved_far(r)]
    far = [rows[k] for k in far_rows]
    record = {
        "rows": rows,
        "query": int(queries[0]),
        "n": len(loo_idx),
        "pearson": stats.pearson,
        "spearman": stats.spearman,
        "max_gradient_norm": float(loo.gradient_norms.max()),
        "tolerance": section["tolerance"],
        "max_iter": section["max_iter"],
        "not_converged": unconverged,
        "start_move": loo.start_move,
        "start_move_ratio": loo.start_move_ratio,
        "estimator": inf.estimator,
        # ("auto" and a Kronecker method's per-module damping count: a reviewer's kfac at
        # damping="auto" was read as undamped)
        "damping": _damping_of(inf),
        "moved_far": [
            {
                "index": r["train_index"],
                "moved": r["moved"],
                "cosine": r["cosine"],
                "converged": r["converged"],
            }
            for r in far
        ],
    }
    rest = [k for k in range(len(rows)) if k not in far_rows]
    if far and len(rest) >= MIN_RETRAININGS:
        record["pearson_without_far"] = evaluate.correlation(predicted[rest], actual[rest]).pearson
    if unconverged:
        warn(not_converged_message(record, config.path.name))
    if record["start_move_ratio"] > retraining.START_MOVE:
        warn(start_moved_message(record))
    if far:
        warn(moved_far_message(record))
    return record


def start_moved_message(record: dict[str, Any]) -> str:
    """The model was not at its optimum: what the retraining check's actual changes are."""
    return (
        "the model is not at the optimum of its objective on the training set: retraining on "
        f"all of it moved the parameters by {record['start_move']:.3g}, "
        f"{record['start_move_ratio']:.3g} times the median leave-one-out change. The "
        "retraining check measures each actual change from that retrained model (so they are "
        "the removals' own), while the scores describe the model given, another point: where "
        "they differ, train the model to its optimum (infkit.train_to_optimum) and run again "
        "(docs/evaluation.md §2)"
    )


#: the columns of top_k.csv
TOP_K_COLUMNS = ("query", "estimator", "kind", "rank", "train_index", "label", "score")

#: a retraining whose parameters moved this many times the length of the estimator's step
#: (or at less than :data:`FAR_COSINE` from its direction) is told apart: its response was
#: not the linear one the influence function models
FAR_MOVE = 3.0
FAR_COSINE = 0.5


def parameter_steps(inf: Influence, loo: retraining.LeaveOneOut) -> list[dict[str, float | None]]:
    """For each retraining, how its actual parameter change compares with the estimator's
    step ``inf.remove([j]).params``, over the parameters the method attributes: ``moved``
    (the ratio of their lengths) and ``cosine`` (of their directions); none where the method
    or the estimator (RelatIF) predicts no parameter change."""
    estimator = inf.estimator_spec
    if not (inf.method.answers("remove") and inf.method.supplies(estimator.name)):
        return []
    if not estimator.counterfactual:  # RelatIF predicts no removal
        return []
    # the retrainings move every trainable parameter; the step, those the method attributes
    everything = ParameterSpace(inf.task.model)
    attributed = inf.fitted.space
    out: list[dict[str, float | None]] = []
    for j, actual in zip(loo.indices.tolist(), loo.params):
        try:
            step = inf.remove([j]).params.reshape(-1).to(torch.float64)
        except InfkitError:  # no step for it (rif/newton at a leverage >= 1): no figures
            out.append({"moved": None, "cosine": None})
            continue
        moved = attributed.flatten(everything.unflatten(actual.reshape(-1))).to(torch.float64)
        length = float(step.norm())
        both = length * float(moved.norm())
        out.append(
            {
                "moved": float(moved.norm()) / length if length > 0 else float("inf"),
                "cosine": float(step @ moved) / both if both > 0 else 0.0,
            }
        )
    return out


def _damping_of(inf: Influence) -> float | str:
    """The run's damping as the retraining check's reading names it: its number, ``"auto"``,
    or the largest of a Kronecker method's per-module dampings where those are set."""
    described = inf.describe()
    per_module = described.get("module_damping")
    if isinstance(per_module, dict) and per_module and described["damping"] != "auto":
        largest = max(float(v) for v in per_module.values())
        return max(float(described["damping"]), largest)
    damping = described["damping"]
    return damping if isinstance(damping, str) else float(damping)


def moved_far(row: dict[str, Any]) -> bool:
    """Whether a retraining's parameters moved far from the estimator's step: at least
    :data:`FAR_MOVE` times its length, or at a cosine below :data:`FAR_COSINE` to it."""
    if row.get("moved") is None:
        return False
    return bool(row["moved"] >= FAR_MOVE or row["cosine"] < FAR_COSINE)


def moved_far_message(record: dict[str, Any]) -> str:
    """What retrainings that moved far beyond the estimator's step mean for the check."""
    far = record["moved_far"]
    names = ", ".join(retraining_name(r) for r in far[:8]) + (", ..." if len(far) > 8 else "")
    moved = [r["moved"] for r in far]
    cosines = [r["cosine"] for r in far]
    without = record.get("pearson_without_far")
    rest = (
        f" The other {record['n'] - len(far)} correlate at Pearson {without:.3f}."
        if without is not None
        else ""
    )
    return (
        f"{len(far)} of the {record['n']} leave-one-out retrainings ({names}) moved the "
        f"parameters {value_range(moved, '.1f')} times as far as the estimator's step, "
        f"at a cosine of {value_range(cosines, '.2f')} to it. {far_reading(far, record)}{rest} "
        "loo.csv has moved and cosine for each (docs/report.md §4)"
    )


def not_converged(loo: retraining.LeaveOneOut) -> list[dict[str, Any]]:
    """The retrainings that stopped short of their target: ``index``, final ``gradient_norm``
    and the ``target`` it had to reach (:func:`infkit.train_to_optimum`'s stopping rule)."""
    return [
        {"index": j, "gradient_norm": norm, "target": target}
        for j, norm, target, done in zip(
            loo.indices.tolist(),
            loo.gradient_norms.tolist(),
            loo.targets.tolist(),
            loo.converged.tolist(),
        )
        if not done
    ]


def not_converged_message(record: dict[str, Any], where: str) -> str:
    """What the unconverged retrainings mean for the check, and what to change."""
    worst, which = worst_norm(record["not_converged"])
    removals = [r for r in record["not_converged"] if r["index"] is not None]
    start = len(removals) < len(record["not_converged"])
    counted = f"{len(removals)} of the {record['n']} leave-one-out retrainings" + (
        " and the retraining on all the data that their changes are measured from" if start else ""
    )
    if start and not removals:
        counted = "the retraining on all the data that the leave-one-out changes are measured from"
    return (
        f"{counted} did not "
        f"converge ([retraining] max_iter = {record['max_iter']}; largest "
        f"final gradient norm {worst['gradient_norm']:.4g}, {which}, against a target of "
        f"{worst['target']:.3g}, from tolerance = {record['tolerance']:g}): their actual "
        "changes are not those of a retrained optimum, so the retraining check's correlations "
        f"are not ground truth. Raise [retraining] max_iter in {where}; if the gradient norm "
        "stalls instead, loosen tolerance (a float32 model stops near its precision) or train "
        "the model closer to its optimum (retraining starts from it)"
    )


def _warn_solve_per_example(
    method: str, asked: list[str], solves: int, n: int, n_queries: int, seconds: float
) -> None:
    """Tell that ``asked`` (RelatIF, self-influence) solve a system per training example by
    ``method``'s iterations, ``solves`` times over (once when they share them), priced at the
    pace the queries' solves took."""
    estimate = seconds * n / max(n_queries, 1) * solves
    shared = " (shared by both)" if solves < len(asked) else ""
    warn(
        f"{' and '.join(asked)} by {method!r} solve a system per training example by its "
        f"iterations: {solves} x {n:,} solves{shared}, where the {n_queries} queries' took "
        f"{seconds:.1f} s (up to about {estimate:.0f} s more at their pace; less where the solves "
        "run in larger blocks). A direct method (ekfac, "
        "exact) answers them at once; [self_influence] enabled = false leaves that part out",
        Notice,
    )


def _explanations(
    inf: Influence,
    display: Display,
    queries: Tensor,
    query_set: ExampleSet,
    top: Any,
    rel_top: Any,
    predicted: list[str] | None,
) -> list[dict[str, Any]]:
    """One record per explained query: its view, label, prediction and both ranked lists.

    A list keeps the examples of its sign only: the proponents those whose removal is predicted
    to make the measurement worse (a loss higher), the opponents better; where fewer than k
    examples have that sign the list is shorter (k above the count of helpful examples would
    otherwise rank harmful ones as proponents)."""
    helpful_sign = inf.task.helpful_sign
    token_scores = None
    if display.kind == "text" and inf.method.answers("token_scores"):
        token_scores = inf if inf.estimator == "if" else inf.with_estimator("if")
    out = []
    for q, t in enumerate(queries.tolist()):
        lists = {}
        for name, ranked in (("if", top), ("relatif", rel_top)):
            if ranked is None:
                continue
            lists[name] = {
                kind: [
                    {
                        "index": int(j),
                        "score": float(s),
                        "label": display.label("train", int(j)),
                        "target": display.label("train", int(j), exact=True),
                        "view": display.view("train", int(j)),
                    }
                    for j, s in zip(
                        getattr(ranked, f"{kind}_indices")[q], getattr(ranked, f"{kind}_scores")[q]
                    )
                    if float(s) * helpful_sign * sign > 0
                ]
                for kind, sign in (("proponent", 1.0), ("opponent", -1.0))
            }
        if token_scores is not None:
            _add_token_scores(token_scores, query_set.part([q]), lists["if"], inf.estimator)
        record: dict[str, Any] = {
            "index": t,
            "label": display.label("test", t),
            "view": display.view("test", t),
            "lists": lists,
        }
        if predicted is not None:
            record["predicted"] = predicted[q]
        out.append(record)
    return out


def _add_token_scores(
    inf: Influence, query: ExampleSet, lists: dict[str, Any], listed_by: str
) -> None:
    """Per-token contributions of each listed training sequence to the query's IF score, and
    the part of that score not split by position (``token_rest``: the regulariser's share,
    layers that do not act position by position, and positions the view leaves out), so that
    the two add up to the IF score: the listed score where the lists are by IF (``listed_by``,
    the run's estimator; ``token_estimator`` says whose split it is)."""
    rows = lists["proponent"] + lists["opponent"]
    if not rows:
        return
    # (a small training set can list an example as both: its tokens are split once)
    indices = sorted({r["index"] for r in rows})
    split = inf.token_scores(query, indices)
    width = split.tokens.shape[-1]
    longest = max((max(r["view"].get("positions", []), default=-1) for r in rows), default=-1)
    if longest >= width:
        # (a tester's classifier pooled its token embeddings before its layers: an IndexError,
        # and the run stopped)
        warn(
            f"the per-token split finds {width} position(s) per example where the texts have "
            f"up to {longest + 1} tokens: the layers it decomposes act after the sequence is "
            "pooled, not on each token, so the lists are shown without per-token scores (a "
            "model whose layers act on each token, as a language model's, has them)",
            Notice,
        )
        return
    for r in rows:
        j = indices.index(r["index"])
        tokens = split.tokens[0, j]
        # the positions the view shows (padding left out, wherever it is; none for a text
        # given by [data] display)
        shown = tokens[r["view"].get("positions", [])]
        r["view"]["token_scores"] = shown.tolist()
        r["view"]["token_rest"] = float(split.rest[0, j] + tokens.sum() - shown.sum())
        r["view"]["token_estimator"] = "if"
        if listed_by != "if":
            r["view"]["token_total"] = float(split.rest[0, j] + tokens.sum())


def _groups(
    inf: Influence, groups: dict[str, Tensor], query_set: ExampleSet, scores: Tensor
) -> list[dict[str, Any]]:
    """Each group's predicted joint removal effect on the queries' measurements: by one Newton
    step on the retained objective where the method supplies it (it accounts for the group's
    own curvature), else by the run's estimator; beside the sum of the members' scores.

    The Newton step downdates the group's own exact curvature block, so it is taken only with a
    method whose curvature holds every example's (``exact_example_curvature``): against K-FAC's
    or EK-FAC's approximation a block near the whole curvature makes it blow up. Where it is
    out of reach (that, or a step that raises: leverage >= 1, output Jacobians beyond the
    memory limit) the group falls back to the run's estimator, and its record says why."""
    method = inf.method
    newton = method.supplies("newton") and type(method).exact_example_curvature
    joint = inf.with_estimator("newton") if newton else inf
    approximate = None
    if not method.supplies("newton"):  # (said for EK-FAC alone, not for identity or trak)
        approximate = (
            f"no newton step: method {method.name!r} does not supply one (infkit.methods() lists "
            "the estimators each method supplies)"
        )
    elif not newton:
        approximate = (
            f"no newton step: method {method.name!r} approximates the curvature and does not "
            "hold each example's exact block, which the step removes (a method marked "
            "exact_curvature in infkit.methods() does)"
        )
    out = []
    for name, idx in groups.items():
        used, fallback = joint, approximate
        try:
            effect = joint.remove(idx)
        except (CurvatureError, UnsupportedError) as error:
            if joint is inf:
                raise
            used, fallback = inf, f"no newton step: {error}"
            effect = inf.remove(idx)
        record = {
            "name": name,
            "size": len(idx),
            "joint": effect.measurement(query_set).tolist(),
            "additive": scores[:, idx].sum(1).tolist(),
            "estimator": used.estimator,
        }
        if fallback is not None:
            record["fallback"] = fallback
        out.append(record)
    return out


def _summary(
    inf: Influence,
    model: nn.Module,
    train: ExampleSet,
    test: ExampleSet,
    origin: str,
    workdir: Path,
) -> dict[str, Any]:
    described = inf.describe()
    return {
        "infkit": __version__,
        "torch": torch.__version__,
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "attributed_parameters": inf.n_params,
        "n_train": len(train),
        "n_test": len(test),
        "task": inf.task.name,
        "measurement": measurement_name(inf.task),
        "higher_is_better": inf.task.higher_is_better,
        "method": described.get("method", inf.method.name),
        "estimator": inf.estimator,
        "l2": inf.l2,
        "damping": described.get("damping"),
        "stationarity": inf.stationarity,
        "influence": origin,
        "diagnostics": {**inf.method.checks, **inf.method.query_checks},
        "describe": described,
        "workdir": str(workdir),
    }


#: the table each optional section of a run writes
SECTION_TABLES = {
    "retraining": "loo.csv",
    "self_influence": "self_influence.csv",
    "groups": "group_removal.csv",
    "layers": "layers.csv",
}


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A self-influence row as its CSV table keeps it: no view, the label in full precision
    (the page shows 4 digits: a regression target of 1.66048 read 1.66)."""
    out = {k: v for k, v in row.items() if k not in ("view", "target")}
    out["label"] = row.get("target", row["label"])
    return out


def _write_tables(workdir: Path, data: dict[str, Any]) -> None:
    rows = []
    # the lists are kept as "if" (the run's estimator's: RIF's scores under estimator = "rif",
    # a tester's table said "if") and "relatif" (RelatIF's beside it)
    run = data["summary"]["estimator"]
    for q in data["queries"]:
        for listed_as, lists in q["lists"].items():
            estimator = run if listed_as == "if" else listed_as
            for kind, items in lists.items():
                for rank, item in enumerate(items, start=1):
                    rows.append(
                        {
                            "query": q["index"],
                            "estimator": estimator,
                            "kind": kind,
                            "rank": rank,
                            "train_index": item["index"],
                            "label": item.get("target", item["label"]),
                            "score": item["score"],
                        }
                    )
    # (every list can be empty: a query no training example moves; the header still replaces
    # an earlier run's table)
    save_csv(workdir / "top_k.csv", rows, TOP_K_COLUMNS)
    if "retraining" in data:
        save_csv(workdir / "loo.csv", data["retraining"]["rows"])
    if "self_influence" in data:
        save_csv(
            workdir / "self_influence.csv",
            [_table_row(r) for r in data["self_influence"]["rows"]],
        )
    if "groups" in data:
        save_csv(
            workdir / "group_removal.csv",
            [
                {
                    "group": g["name"],
                    "size": g["size"],
                    "estimator": g["estimator"],
                    "query": q["index"],
                    "joint": j,
                    "additive": a,
                }
                for g in data["groups"]
                for q, j, a in zip(data["queries"], g["joint"], g["additive"])
            ],
        )
    if "layers" in data:
        save_csv(
            workdir / "layers.csv", [{"layer": k, "share": v} for k, v in data["layers"].items()]
        )
