"""The run configuration of ``infkit run CONFIG.toml``: every key, its type, default and meaning.

:data:`SCHEMA` is the one description of the file: :func:`parse` checks a configuration against
it (an unknown section or key, a value of the wrong type, a missing required key: a
:class:`~infkit.errors.ConfigError` naming the key and what it accepts) and fills the defaults;
:func:`help_text` prints it for ``infkit run --help`` (docs/report.md §2).
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infkit.errors import ConfigError
from infkit.estimators import RELATIF_NORMS
from infkit.evaluate import MIN_PAIRS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class Key:
    """One configuration key: its type (``str``, ``int``, ``float``, ``bool``, ``list[int]``,
    ``list[str]``, ``table``, or alternatives joined by ``|``), default and meaning."""

    type: str
    default: Any
    doc: str
    required: bool = False


#: the fewest leave-one-out retrainings a retraining check can use: it correlates predicted with
#: actual changes, and :func:`infkit.evaluate.correlation` needs at least this many pairs
MIN_RETRAININGS = MIN_PAIRS

TASK_KINDS = ("classification", "binary_classification", "regression", "language_modeling")
DISPLAY_KINDS = ("auto", "image", "text", "tabular")
#: the estimators a report's tables are of (RelatIF's scores are shown beside IF's in every one)
REPORTED_ESTIMATORS = ("if", "rif", "newton")

#: section -> key -> :class:`Key`; the order is the order of ``infkit run --help``
SCHEMA: dict[str, dict[str, Key]] = {
    "model": {
        "factory": Key(
            "str",
            None,
            '"module:callable" returning the trained torch.nn.Module (the module is imported with '
            "the config's folder on sys.path)",
            required=True,
        ),
        "args": Key("table", {}, "keyword arguments passed to the model factory"),
    },
    "data": {
        "factory": Key(
            "str",
            None,
            '"module:callable" returning (train, test), each in any form Influence accepts: '
            "(X, y) tensors or arrays, a Dataset of (x, y) pairs or of dicts",
            required=True,
        ),
        "args": Key("table", {}, "keyword arguments passed to the data factory"),
        "kind": Key(
            "str",
            "auto",
            "how examples are shown in the report: auto, image, text or tabular (auto: inputs "
            "[N, H, W] or [N, C, H, W] are images, token ids or a language-modelling task text, "
            "other inputs tabular)",
        ),
        "image_shape": Key("list[int]", [], "(H, W) or (C, H, W) to show flat inputs as images"),
        "display": Key(
            "str",
            "",
            '"module:callable" returning (train_items, test_items) to show instead of the '
            "inputs: strings (text) or arrays (images), one per example; called with the data "
            "factory's args",
        ),
        "decode": Key(
            "str",
            "",
            '"module:callable" mapping a list of token ids to a list of strings (text shown '
            "token by token; default: the ids)",
        ),
        "class_names": Key("list[str]", [], "a name per class, shown instead of label numbers"),
        "feature_names": Key("list[str]", [], "a name per input feature (tabular data)"),
    },
    "task": {
        "kind": Key("str", "classification", "one of: " + ", ".join(TASK_KINDS)),
        "measurement": Key(
            "str", "loss", 'what a score measures: "loss", or "margin" for the classification kinds'
        ),
        "factory": Key(
            "str",
            "",
            '"module:callable" taking the model and returning an infkit.Task (replaces kind)',
        ),
    },
    "influence": {
        "method": Key("str", "auto", "a registered method (infkit methods) or auto"),
        "estimator": Key("str", "if", "if, rif or newton (RelatIF is shown beside IF anyway)"),
        "l2": Key("float", 0.0, "the L2 coefficient the model was trained with (mean form)"),
        "damping": Key("float|str", 0.0, 'extra numerical damping, or "auto" (Kronecker methods)'),
        "batch_size": Key("int", 64, "examples per batch of every pass over the data"),
        "relatif": Key("str", "theta", "RelatIF's normalisation: theta or loss"),
        "options": Key("table", {}, "the method's options (infkit methods --json lists them)"),
        "checks": Key(
            "bool|str",
            True,
            "run the post-fit checks of the answer (false skips them: on large models they "
            'cost passes over a sample; "queries" adds the queries\' energy ratio at any size)',
        ),
        "reuse": Key(
            "bool",
            True,
            "reload the fitted influence saved in the workdir when it belongs to this model, "
            "data and settings (otherwise fit again)",
        ),
    },
    "report": {
        "title": Key("str", "", "the report's title (default: the config file's name)"),
        "queries": Key(
            "list[int]", [], "test examples to explain (default: the n_queries highest-loss ones)"
        ),
        "n_queries": Key("int", 3, "how many test examples to explain when queries is not given"),
        "top_k": Key("int", 8, "proponents and opponents shown per query"),
    },
    "self_influence": {
        "enabled": Key("bool", True, "rank the training set by self-influence"),
        "top": Key("int", 20, "how many of the highest-ranked examples the report shows"),
        "flagged": Key(
            "list[int]|str",
            [],
            'known-bad training indices (flipped labels, planted poison), or "module:callable" '
            "returning them: detection AUC and curve against them",
        ),
    },
    "group_removal": {
        "groups": Key(
            "table",
            {},
            "name = [training indices]: each group's predicted joint removal effect on the "
            "explained queries",
        ),
    },
    "retraining": {
        "n": Key(
            "int",
            0,
            "leave-one-out check: retrain without each of the n training examples with the "
            f"largest |score| for the first query, and compare (0: off; otherwise at least "
            f"{MIN_RETRAININGS}, the fewest a correlation takes)",
        ),
        "tolerance": Key("float", 1e-8, "gradient-norm tolerance of each retraining"),
        "max_iter": Key(
            "int",
            2000,
            "iterations allowed per retraining (a retraining that does not reach its tolerance "
            "within them is reported as not converged)",
        ),
    },
    "layers": {
        "enabled": Key("bool", True, "per-layer scores when the method gives them"),
    },
    "output": {
        "workdir": Key(
            "str",
            "",
            "the run directory, relative to the config (default: runs/<config name> beside it)",
        ),
    },
}


@dataclass
class RunConfig:
    """A checked configuration: every section with every key (defaults filled in)."""

    path: Path
    sections: dict[str, dict[str, Any]]

    @property
    def folder(self) -> Path:
        """The folder of the config file: relative paths and factory modules start here."""
        return self.path.parent

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    def workdir(self, override: str | Path | None = None) -> Path:
        """The run directory: ``override`` (``--out``), ``[output] workdir``, or the default."""
        chosen = override or self.sections["output"]["workdir"]
        if not chosen:
            return self.folder / "runs" / self.path.stem
        path = Path(chosen)
        path = path if path.is_absolute() or override else self.folder / path
        if path.exists() and not path.is_dir():
            where = "--out" if override else "[output] workdir"
            raise ConfigError(
                f"{where} = {str(chosen)!r}: {path} is a file, not a directory; name a directory "
                "(created when missing) for the run's results"
            )
        return path

    def record(self) -> dict[str, Any]:
        """The settings as JSON (for ``settings.json`` and the report)."""
        return {"config": str(self.path), **self.sections}


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _not_finite(value: Any) -> tuple[str, float] | None:
    """Where ``value`` holds TOML's ``nan`` or ``inf`` (``""``, ``".key"`` or ``"[i]"`` below
    it) and that number, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "", value
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for k, v in items:
        found = _not_finite(v)
        if found is not None:
            plain = isinstance(k, str) and k.isidentifier()
            step = f".{k}" if plain else f"[{k!r}]" if isinstance(k, str) else f"[{k}]"
            return step + found[0], found[1]
    return None


def _type_ok(value: Any, kind: str) -> bool:
    for alternative in kind.split("|"):
        if alternative == "str" and isinstance(value, str):
            return True
        if alternative == "bool" and isinstance(value, bool):
            return True
        if alternative == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if (
            alternative == "float"
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            return True
        if alternative == "table" and isinstance(value, dict):
            return True
        if alternative.startswith("list[") and isinstance(value, list):
            inner = alternative[5:-1]
            if all(_type_ok(v, inner) for v in value):
                return True
    return False


def check(raw: dict[str, Any], path: Path) -> RunConfig:
    """Check a parsed TOML document against :data:`SCHEMA`; fill the defaults.

    Raises:
        ConfigError: naming the section and key, what was found and what is accepted.
    """
    where = path.name
    sections: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            owners = [s for s, keys in SCHEMA.items() if name in keys]
            hint = f" (it belongs in {', '.join(f'[{s}]' for s in owners)})" if owners else ""
            raise ConfigError(
                f"{where}: {name} = {value!r} is outside any section{hint}; every key belongs "
                "to a section (infkit run --help documents them)"
            )
        if name not in SCHEMA:
            raise ConfigError(
                f"{where}: unknown section [{name}]{_suggest(name, list(SCHEMA))}; sections: "
                + ", ".join(f"[{s}]" for s in SCHEMA)
                + " (infkit run --help documents every key)"
            )
    for section, keys in SCHEMA.items():
        given = dict(raw.get(section, {}))
        for key, value in given.items():
            if key not in keys:
                owners = [s for s, other in SCHEMA.items() if key in other]
                hint = (
                    f" (it belongs in {', '.join(f'[{s}]' for s in owners)})"
                    if owners
                    else _suggest(key, list(keys))
                )
                raise ConfigError(
                    f"{where}: unknown key {key!r} in [{section}]{hint}; "
                    f"[{section}] takes: {', '.join(keys)}"
                )
            spec = keys[key]
            if not _type_ok(value, spec.type):
                raise ConfigError(
                    f"{where}: [{section}] {key} must be {spec.type.replace('|', ' or ')}, got "
                    f"{value!r}"
                )
            # (TOML's nan and inf, in tables and arrays too; not in the factories' own keyword
            # arguments, where infinity can mean "no limit")
            place = None if key == "args" else _not_finite(value)
            if place is not None:
                raise ConfigError(
                    f"{where}: [{section}] {key}{place[0]} must be a finite number, got "
                    f"{place[1]!r}"
                )
        for key, spec in keys.items():
            if spec.required and key not in given:
                raise ConfigError(
                    f"{where}: [{section}] {key} is required: {spec.doc}"
                    if section in raw
                    else f"{where}: the section [{section}] with its key {key} is required: "
                    f"{spec.doc}"
                )
        sections[section] = {key: given.get(key, spec.default) for key, spec in keys.items()}
    _check_values(sections, where, path.parent)
    return RunConfig(path, sections)


def _check_values(sections: dict[str, dict[str, Any]], where: str, folder: Path) -> None:
    """The checks a type cannot express: choices and ranges."""
    choices = {
        ("task", "kind"): TASK_KINDS,
        ("data", "kind"): DISPLAY_KINDS,
        ("influence", "estimator"): REPORTED_ESTIMATORS,
        ("influence", "relatif"): RELATIF_NORMS,
    }
    for (section, key), allowed in choices.items():
        value = sections[section][key]
        if value not in allowed:
            shown = (  # RelatIF's scores are no counterfactual: the page shows them beside IF's
                " (RelatIF is shown beside IF in every report; set [influence] relatif = "
                '"theta" or "loss" for its normalisation)'
                if (section, key) == ("influence", "estimator") and value == "relatif"
                else _suggest(value, list(allowed))
            )
            raise ConfigError(
                f"{where}: [{section}] {key} = {value!r} is not one of {', '.join(allowed)}{shown}"
            )
    for section, key, low in (
        ("report", "n_queries", 1),
        ("report", "top_k", 1),
        ("self_influence", "top", 1),
        ("retraining", "n", 0),
        ("retraining", "max_iter", 1),
        ("influence", "batch_size", 1),
    ):
        if sections[section][key] < low:
            raise ConfigError(f"{where}: [{section}] {key} must be >= {low}")
    _check_retraining(sections["retraining"], where)
    _check_method(sections, where, folder)
    checks = sections["influence"]["checks"]
    if isinstance(checks, str) and checks != "queries":
        raise ConfigError(
            f'{where}: [influence] checks must be true, false or "queries", got {checks!r}'
        )
    damping = sections["influence"]["damping"]
    if isinstance(damping, str) and damping != "auto":
        raise ConfigError(
            f'{where}: [influence] damping must be a number or "auto", got {damping!r}'
        )
    kind, custom = sections["task"]["kind"], sections["task"]["factory"]
    if (
        sections["data"]["class_names"]
        and kind in ("regression", "language_modeling")
        and not custom
    ):
        raise ConfigError(
            f"{where}: [data] class_names names classes, and [task] kind = {kind!r} has none: "
            "remove it (a regression's targets are shown as numbers)"
            if kind == "regression"
            else f"{where}: [data] class_names names classes, and [task] kind = {kind!r} has "
            "none: remove it (text is shown as tokens; [data] decode maps their ids to strings)"
        )
    shape = sections["data"]["image_shape"]
    if shape and len(shape) not in (2, 3):
        raise ConfigError(f"{where}: [data] image_shape must be (H, W) or (C, H, W), got {shape}")
    for name, indices in sections["group_removal"]["groups"].items():
        if not _type_ok(indices, "list[int]") or not indices:
            raise ConfigError(
                f"{where}: [group_removal] groups.{name} must be a non-empty list of training "
                f"indices, got {indices!r}"
            )
        _check_index_list(indices, f"[group_removal] groups.{name}", where)
    _check_index_list(sections["report"]["queries"], "[report] queries", where)
    flagged = sections["self_influence"]["flagged"]
    if isinstance(flagged, list):
        _check_index_list(flagged, "[self_influence] flagged", where)
    if not isinstance(damping, str) and damping < 0:
        raise ConfigError(f'{where}: [influence] damping must be >= 0 or "auto", got {damping!r}')


def _check_index_list(indices: list[int], option: str, where: str) -> None:
    """A list of indices naming one twice or a negative one, refused before any factory runs
    (the ranges need the data, and were checked only after the model's factory had trained
    it)."""
    seen: set[int] = set()
    for index in indices:
        if index < 0:  # (a negative index counts from the end nowhere in infkit)
            raise ConfigError(f"{where}: {option} index {index} is negative: indices start at 0")
        if index in seen:
            raise ConfigError(
                f"{where}: {option} index {index} is given twice: name each example once"
            )
        seen.add(index)


def _check_method(sections: dict[str, dict[str, Any]], where: str, folder: Path) -> None:
    """The method's name, the names of its options and ``l2``, before any factory runs (the
    model's may take long): a misspelt method or option stopped a run only after it. A name
    not registered yet is looked for again once the project's factory modules are imported
    (not called): a module may register a method of its own."""
    from infkit.methods import method_class, registered  # the registry, filled on import
    from infkit.options import FACADE_KEYWORDS, suggest_option
    from infkit.report import factories

    section = sections["influence"]
    name = section["method"]
    if name != "auto" and name not in registered():
        for key in ("model", "data"):
            factories.resolve(sections[key]["factory"], f"[{key}] factory", folder)
    if name != "auto" and name not in registered():
        raise ConfigError(
            f"{where}: [influence] method = {name!r} is not a registered method; valid: "
            f"{', '.join(sorted(registered()))} or auto{_suggest(name, list(registered()))}"
        )
    l2 = section["l2"]
    if not 0 <= l2 < float("inf"):
        raise ConfigError(f"{where}: [influence] l2 must be a finite number >= 0, got {l2!r}")
    if name == "auto":
        return
    cls = method_class(name)
    known = [*cls.Options.names(), *cls.Options.aliases, *FACADE_KEYWORDS]
    unknown = [k for k in section["options"] if k not in known]
    if unknown:
        hints = ", ".join(f"{k!r}{suggest_option(k, cls.Options.names())}" for k in unknown)
        raise ConfigError(
            f"{where}: [influence] options: method {name!r} does not take {hints}; its options "
            f"are {', '.join(cls.Options.names()) or 'none'} (infkit methods --json lists them)"
        )


def _check_retraining(section: dict[str, Any], where: str) -> None:
    """A retraining check is off (``n = 0``) or has enough retrainings to correlate."""
    n = section["n"]
    if 0 < n < MIN_RETRAININGS:
        raise ConfigError(
            f"{where}: [retraining] n = {n} is too few: the check correlates predicted with "
            f"actual leave-one-out changes, which needs at least {MIN_RETRAININGS} retrainings; "
            f"set n >= {MIN_RETRAININGS} (20 is a good start) or n = 0 to turn the check off"
        )
    if not 0 <= section["tolerance"] < 1:
        raise ConfigError(
            f"{where}: [retraining] tolerance must be >= 0 and below 1, got "
            f"{section['tolerance']!r} (relative to each retraining's starting gradient norm: "
            "1 or more stops before the first step)"
        )


def parse(path: str | Path) -> RunConfig:
    """Read and check a TOML run configuration.

    Raises:
        ConfigError: the file is missing, not TOML, or does not match :data:`SCHEMA`.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path.name} is not valid TOML: {error}") from error
    return check(raw, path)


def help_text() -> str:
    """Every section and key with its type, default and meaning (``infkit run --help``)."""
    lines = ["configuration keys (TOML), by section:"]
    for section, keys in SCHEMA.items():
        lines.append(f"\n  [{section}]")
        for key, spec in keys.items():
            default = "required" if spec.required else f"default {spec.default!r}"
            lines.append(f"    {key} ({spec.type}, {default})")
            lines.append(f"        {spec.doc}")
    return "\n".join(lines)
