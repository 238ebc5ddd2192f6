"""``infkit run`` and ``infkit report``: a tester-style project end to end, config errors, the
page's content checked against the library's own answers (docs/report.md)."""

from __future__ import annotations

import copy
import csv
import importlib.util
import os
import re
import shutil
import textwrap
import types
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import infkit
from infkit import cli
from infkit.errors import ConfigError, Notice
from infkit.report import config as run_config
from infkit.report import load_results

PROJECT = """
import torch
from sklearn.datasets import load_digits

import infkit

L2 = 1e-2


def splits(n_train=150, n_test=40):
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0), torch.tensor(y)
    return (X[:n_train], y[:n_train]), (X[n_train : n_train + n_test], y[n_train : n_train + n_test])


def model():
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 10).double()
    infkit.train_to_optimum(infkit.Task.classification(net), splits()[0], L2)
    return net


def bad_labels():
    return [3, 5, 8, 13]


def twelve_classes():
    torch.manual_seed(0)
    return torch.nn.Linear(64, 12).double()


def half_trained():
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 10).double()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stopped short on purpose
        infkit.train_to_optimum(infkit.Task.classification(net), splits()[0], L2, max_iter=1)
    return net


def normed():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 10)
    ).double()
    infkit.train_to_optimum(infkit.Task.classification(net), splits()[0], L2, tolerance=1e-12)
    return net


def mlp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)
    ).double()
    infkit.train_to_optimum(infkit.Task.classification(net), splits()[0], L2, tolerance=1e-12)
    return net


def diabetes(dtype="float64"):
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X, y = torch.tensor(X), torch.tensor((y - y.mean()) / y.std()).unsqueeze(1)
    X, y = X.to(getattr(torch, dtype)), y.to(getattr(torch, dtype))
    return (X[:120], y[:120]), (X[120:130], y[120:130])


def regressor(dtype="float64"):
    torch.manual_seed(0)
    net = torch.nn.Linear(10, 1).to(getattr(torch, dtype))
    infkit.train_to_optimum(infkit.Task.regression(net), diabetes(dtype)[0], L2, tolerance=1e-6)
    return net


def cancer():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X[:, :5])
    X, y = (X - X.mean(0)) / X.std(0), torch.tensor(y).double()
    return (X[:100], y[:100]), (X[100:110], y[100:110])


def binary():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 1), torch.nn.Flatten(0)).double()
    infkit.train_to_optimum(infkit.Task.binary_classification(net), cancer()[0], L2)
    return net


def cancer_regression():
    (X, y), (Xt, yt) = cancer()
    return (X, y.unsqueeze(1)), (Xt, yt.unsqueeze(1))


def regression_task(model):
    return infkit.Task.regression(model)


def task_of_another_model(model):
    return infkit.Task.classification(torch.nn.Linear(64, 10).double())


def linear():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 1).double()
    infkit.train_to_optimum(infkit.Task.regression(net), cancer_regression()[0], L2)
    return net


def raises():
    raise RuntimeError("the data server is down")


def reads_a_missing_file():
    import numpy

    return numpy.load("no-such-tokens.npy")
"""

CONFIG = """
[model]
factory = "tester_project:model"

[data]
factory = "tester_project:splits"
image_shape = [8, 8]

[influence]
method = "exact"
l2 = 1e-2

[report]
top_k = 4
n_queries = 2

[self_influence]
flagged = "tester_project:bad_labels"

[group_removal]
groups = {{ some = [0, 1, 2, 3, 4] }}

[retraining]
n = {n_loo}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("project")
    (folder / "tester_project.py").write_text(PROJECT)
    (folder / "infkit.toml").write_text(CONFIG.format(n_loo=5))
    return folder


@pytest.fixture(scope="module")
def finished(project: Path) -> Path:
    """The workdir of one run of the tester's config (3 leave-one-out retrainings)."""
    workdir = project / "out"
    assert cli.main(["run", str(project / "infkit.toml"), "--out", str(workdir), "--quiet"]) == 0
    return workdir


def _reference(
    project: Path, method: str = "exact", **options: float
) -> tuple[infkit.Influence, tuple[torch.Tensor, torch.Tensor]]:
    """The same analysis through the library: the project's model and data, same settings."""
    import importlib
    import sys

    sys.path.insert(0, str(project))
    try:
        module = importlib.import_module("tester_project")
    finally:
        sys.path.remove(str(project))
    train, test = module.splits()
    task = infkit.Task.classification(module.model())
    inf = infkit.Influence(task, method, l2=1e-2, progress=False, **options).fit(train)
    return inf, test


def test_run_writes_the_workdir_and_a_self_contained_report(finished: Path) -> None:
    for name in ("report.html", "config.toml", "settings.json", "top_k.csv", "loo.csv"):
        assert (finished / name).is_file(), name
    page = (finished / "report.html").read_text()
    for sid in ("summary", "explanations", "distribution", "self-influence", "group-removal"):
        assert f'id="{sid}"' in page
    # nothing is fetched: every src is a data URI, no stylesheet or script is linked
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]+)"', page))
    assert "<link" not in page and "<script" not in page
    assert "default-src 'none'" in page
    # the model is one nn.Linear, the root module, whose name is empty: a tester's layers.csv
    # read ",1.0"
    with (finished / "layers.csv").open() as f:
        assert list(csv.DictReader(f)) == [{"layer": "(root)", "share": "1.0"}]


def test_proponents_match_influence_top_k(project: Path, finished: Path) -> None:
    """The report's lists are the library's own top_k for the same settings and queries
    (the highest-loss test examples by default)."""
    data, tensors = load_results(finished)
    inf, test = _reference(project)
    losses = torch.nn.functional.cross_entropy(
        inf.task.model(test[0]), test[1], reduction="none"
    ).detach()
    queries = losses.argsort(descending=True)[:2]
    assert torch.equal(tensors["queries"], queries)
    top = inf.top_k((test[0][queries], test[1][queries]), k=4)
    rel = inf.with_estimator("relatif").top_k((test[0][queries], test[1][queries]), k=4)
    for q, record in enumerate(data["queries"]):
        for name, ranked in (("if", top), ("relatif", rel)):
            for kind in ("proponent", "opponent"):
                shown = [item["index"] for item in record["lists"][name][kind]]
                assert shown == getattr(ranked, f"{kind}_indices")[q].tolist()
                scores = torch.tensor(
                    [item["score"] for item in record["lists"][name][kind]], dtype=torch.float64
                )
                expected = getattr(ranked, f"{kind}_scores")[q]
                torch.testing.assert_close(scores, expected, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(tensors["scores"], inf.scores((test[0][queries], test[1][queries])))


def test_self_influence_groups_and_retraining_sections(project: Path, finished: Path) -> None:
    data, tensors = load_results(finished)
    inf, test = _reference(project)
    torch.testing.assert_close(tensors["self_scores"], inf.self_scores(), rtol=1e-9, atol=1e-12)
    assert data["self_influence"]["detection"]["n_flagged"] == 4
    queries = tensors["queries"]
    newton = inf.with_estimator("newton")
    joint = newton.remove([0, 1, 2, 3, 4]).measurement((test[0][queries], test[1][queries]))
    shown = torch.tensor(data["groups"][0]["joint"], dtype=torch.float64)
    torch.testing.assert_close(shown, joint, rtol=1e-9, atol=1e-15)
    assert data["groups"][0]["estimator"] == "newton" and "fallback" not in data["groups"][0]
    additive = tensors["scores"][:, [0, 1, 2, 3, 4]].sum(1)
    torch.testing.assert_close(
        torch.tensor(data["groups"][0]["additive"], dtype=torch.float64), additive
    )
    # the retraining check: the predicted changes against actual retraining, as retrain gives
    assert len(tensors["loo_actual"]) == 5
    assert data["retraining"]["pearson"] > 0.9
    page = (finished / "report.html").read_text()
    assert "Pearson" in page and "ROC AUC" in page


def test_report_rebuilds_without_recomputing(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "report.html").unlink()
    assert cli.main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert 'id="explanations"' in page and page.count('class="query"') == 2
    assert f"from {copy}</footer>" in page  # the copy's page names the copy (it named the run's)
    # a result without its manifest is refused naming it (FileNotFoundError's traceback before)
    broken = tmp_path / "broken"
    shutil.copytree(finished, broken)
    next(broken.glob("report-*/manifest.json")).unlink()
    assert cli.main(["report", str(broken)]) == 2
    # named as the results without their manifest (it said the workdir held no finished run)
    err = capsys.readouterr().err
    assert "has no manifest.json: these results were not committed" in err, err
    # results copied in beside the run's own: drawn from the newest, with a warning naming the
    # others (a tester's stale copy was drawn without a word)
    twice = tmp_path / "twice"
    shutil.copytree(finished, twice)
    (own,) = twice.glob("report-*")
    # a workdir named like results is a workdir (a reviewer's report-jan was refused)
    named = tmp_path / "report-jan"
    shutil.copytree(finished, named)
    assert cli.main(["report", str(named)]) == 0
    stale = twice / "report-0123456789abcdef0123456789abcdef"
    shutil.copytree(own, stale)
    os.utime(stale / "manifest.json", (1e9, 1e9))  # the older of the two
    with pytest.warns(UserWarning, match=rf"holds 2 runs' results: drawing the newest.*{own.name}"):
        assert cli.main(["report", str(twice)]) == 0
    # a damaged result is refused, naming the file
    scores = next(copy.glob("report-*/scores.safetensors"))
    raw = bytearray(scores.read_bytes())
    raw[-1] ^= 0xFF
    scores.write_bytes(bytes(raw))
    assert cli.main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "scores.safetensors is damaged" in err
    assert "overwrite=True" not in err  # a keyword of the Python API, not of the command
    # the command it gives recomputes the results in the same workdir, and the page rebuilds
    command = re.search(r"`infkit run (\S+) --out (\S+)`", err)
    assert command is not None, err
    assert Path(command.group(2)) == copy
    assert cli.main(["run", command.group(1), "--out", command.group(2), "--quiet"]) == 0
    assert cli.main(["report", str(copy)]) == 0
    # a page that cannot be written is told, with the option that writes it elsewhere (a
    # tester's unwritable workdir met a traceback)
    (tmp_path / "file").write_text("x")
    assert cli.main(["report", str(copy), "--out", str(tmp_path / "file" / "page.html")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the report to" in err and "give --out FILE" in err, err


def test_second_run_reloads_the_saved_influence(project: Path, finished: Path) -> None:
    """... and says so, as it says the retrainings it reads again (a tester's rerun printed
    what a fresh run prints)."""
    before = load_results(finished)[1]
    with pytest.warns(Notice) as said:
        code = cli.main(["run", str(project / "infkit.toml"), "--out", str(finished), "--quiet"])
    assert code == 0
    told = [str(w.message) for w in said]
    assert any(m.startswith("reusing the influence saved in") for m in told), told
    assert any(
        re.match(r"\d+ of the \d+ leave-one-out retrainings were read from", m) for m in told
    )
    data, after = load_results(finished)
    assert data["summary"]["influence"] == "reloaded"
    assert torch.equal(before["scores"], after["scores"])


def test_a_second_run_in_a_workdir_in_use_is_refused_until_the_first_ends(
    project: Path, finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Two runs at once in one workdir took each other's work in progress for a stopped run's
    and replaced each other's results: a run started while another process holds the workdir
    is refused before it builds anything, naming that process; once the holder is killed (its
    lock goes with it) the workdir runs again."""
    import subprocess
    import sys

    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from infkit.report import lock\n"
            "with lock.held(Path(sys.argv[1])):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

        def no_build(*args: object, **kwargs: object) -> None:
            raise AssertionError("built the model in a workdir another run holds")

        with monkeypatch.context() as patched:
            patched.setattr("infkit.report.analysis.build_model", no_build)
            run = ["run", str(project / "infkit.toml"), "--out", str(workdir), "--quiet"]
            assert cli.main(run) == 2
        err = capsys.readouterr().err
        assert f"another infkit run is using the workdir {workdir} (process {holder.pid} on " in err
        assert "another workdir (--out)" in err
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(run) == 0
    assert load_results(workdir)[0]["summary"]["influence"] == "reloaded"


def test_a_workdir_without_locks_runs_unguarded_with_a_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reviewer's: a file system without flock (NFS mounted nolock) raises OSError(ENOLCK),
    not BlockingIOError, which ended the run in a traceback where it ran before the lock."""
    import errno
    import fcntl

    from infkit.report import lock

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = False
    said = r"on a file system without locks \(No locks available\)"
    with pytest.warns(Notice, match=said), lock.held(tmp_path):
        ran = True
    assert ran


def test_a_save_that_never_committed_is_fitted_again_with_a_notice_for_the_command(
    project: Path, finished: Path, tmp_path: Path
) -> None:
    """A run killed while it saved its fit leaves an influence/ folder with nothing committed
    in it (a tester): the next run fits again, saying so in the command's words (the library's
    message advised inf.save(path)), with the same scores."""
    before = load_results(finished)[1]
    copy = tmp_path / "w"
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "influence")
    (copy / "influence" / ".tmp-influence-0123").mkdir(parents=True)  # a save cut short
    assert cli.main(["run", str(project / "infkit.toml"), "--out", str(copy), "--quiet"]) == 0
    data, after = load_results(copy)
    assert data["summary"]["influence"] == "fitted"
    said = " ".join(w["message"] for w in data["warnings"])
    assert "holds no complete saved influence" in said and "inf.save(" not in said
    torch.testing.assert_close(after["scores"], before["scores"], rtol=1e-10, atol=1e-12)


def test_a_damaged_record_of_the_fits_warnings_is_fitted_again_as_a_damaged_save(
    project: Path, finished: Path, tmp_path: Path
) -> None:
    """A damaged influence/ is fitted again with a notice; a damaged record of the fit's
    warnings beside it stopped the run with status 2 (a tester): fitted again the same way,
    with the same scores."""
    before = load_results(finished)[1]
    copy = tmp_path / "w"
    shutil.copytree(finished, copy)
    (record,) = copy.glob("fit-warnings-*/warnings.json")
    with record.open("a") as fh:
        fh.write(" ")
    assert cli.main(["run", str(project / "infkit.toml"), "--out", str(copy), "--quiet"]) == 0
    data, after = load_results(copy)
    assert data["summary"]["influence"] == "fitted"
    said = " ".join(w["message"] for w in data["warnings"])
    assert "the record of its fit's warnings is damaged" in said
    torch.testing.assert_close(after["scores"], before["scores"], rtol=1e-10, atol=1e-12)
    # and the record written again: the next run reloads
    assert cli.main(["run", str(project / "infkit.toml"), "--out", str(copy), "--quiet"]) == 0
    assert load_results(copy)[0]["summary"]["influence"] == "reloaded"


def test_the_page_names_what_the_scores_measure(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tester's margin run: "margin" appeared nowhere on the page, whose text said a
    proponent's removal makes "a loss higher", beside proponents with negative scores (right
    for a margin). The summary names the measurement and its orientation, and the text says
    which way is worse. A rerun that reloads the fit says the fit's warnings on the console too,
    not on the page alone (the model here is off its optimum)."""
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    config = (
        CONFIG.format(n_loo=0)
        .replace(
            "[influence]", '[task]\nkind = "classification"\nmeasurement = "margin"\n\n[influence]'
        )
        .replace('"tester_project:model"', '"tester_project:half_trained"')
    )
    (tmp_path / "m.toml").write_text(config)
    workdir = tmp_path / "w"
    with pytest.warns(UserWarning, match="stationary point"):  # (shown, so recorded)
        assert cli.main(["run", str(tmp_path / "m.toml"), "--out", str(workdir), "--quiet"]) == 0
    page = (workdir / "report.html").read_text()
    assert "margin (higher is better)" in page
    assert "(its margin lower: it helped)" in page and "a loss higher" not in page
    data, _ = load_results(workdir)
    assert data["summary"]["measurement"] == "margin" and data["summary"]["higher_is_better"]
    stationarity = [w for w in data["warnings"] if "stationary point" in w["message"]]
    assert stationarity, data["warnings"]
    capsys.readouterr()
    assert cli.main(["run", str(tmp_path / "m.toml"), "--out", str(workdir), "--quiet"]) == 0
    assert load_results(workdir)[0]["summary"]["influence"] == "reloaded"
    err = capsys.readouterr().err
    assert "(given by the saved fit): the model is not at a stationary point" in err, err


# ---------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c + "\n[reprot]\n", "unknown section [reprot] (did you mean 'report'?)"),
        (lambda c: c.replace("top_k = 4", "topk = 4"), "unknown key 'topk' in [report]"),
        (lambda c: c.replace("top_k = 4", 'top_k = "four"'), "[report] top_k must be int"),
        (lambda c: c.replace("tester_project:model", "tester_project:nothing"), "no attribute"),
        (lambda c: c.replace("tester_project:model", "missing_module:model"), "cannot be imported"),
        (
            lambda c: c.replace("tester_project:splits", "tester_project:raises"),
            "[data] factory = 'tester_project:raises' raised RuntimeError: the data server is down",
        ),
        (  # the line named is the user's call, not numpy's (a tester got numpy's)
            lambda c: c.replace("tester_project:splits", "tester_project:reads_a_missing_file"),
            "No such file or directory: 'no-such-tokens.npy' at ",
        ),
        (lambda c: c.replace('method = "exact"', 'method = "exactt"'), "[influence]"),
        (
            lambda c: c.replace('[model]\nfactory = "tester_project:model"\n', ""),
            "the section [model] with its key factory is required",
        ),
        (lambda c: "top_k = 3\n" + c, "top_k = 3 is outside any section (it belongs in [report])"),
        (  # a key under another section than its own (it said only "unknown key")
            lambda c: c.replace("l2 = 1e-2", "l2 = 1e-2\ntop_k = 3"),
            "unknown key 'top_k' in [influence] (it belongs in [report])",
        ),
        (lambda c: c.replace("n = 5", "n = -1"), "[retraining] n must be >= 0"),
        (
            lambda c: c.replace("l2 = 1e-2", 'l2 = 1e-2\nchecks = "all"'),
            "[influence] checks must be true, false or \"queries\", got 'all'",
        ),
        (
            lambda c: c.replace("n = 5", "n = 2"),
            "bad.toml: [retraining] n = 2 is too few: the check correlates predicted with actual "
            "leave-one-out changes, which needs at least 3 retrainings",
        ),
        # a tester's: these ran to a page showing class 9 as "9", or raised raw tracebacks
        (
            lambda c: c.replace("image_shape = [8, 8]", 'class_names = ["zero", "one"]'),
            "[data] class_names has 2 names, but the training labels hold class 9",
        ),
        (  # (the labels hold classes 0-9, the model 12: checked before the fit)
            lambda c: (
                c.replace("image_shape = [8, 8]", f"class_names = {list('abcdefghij')}")
                .replace(
                    'factory = "tester_project:model"', 'factory = "tester_project:twelve_classes"'
                )
                .replace("[influence]", "[influence]\ndamping = 1e-3")
            ),
            "[data] class_names has 10 names for the model's 12 classes",
        ),
        (
            lambda c: c.replace("image_shape = [8, 8]", 'kind = "tabular"\nfeature_names = ["a"]'),
            "[data] feature_names has 1 names for 64 features per example",
        ),
        (  # (one name, or three, were taken and labels 0 and 1 shown as numbers: a tester's)
            lambda c: (
                c.replace('"tester_project:model"', '"tester_project:binary"')
                .replace('"tester_project:splits"', '"tester_project:cancer"')
                .replace(
                    "image_shape = [8, 8]",
                    'class_names = ["only"]\n[task]\nkind = "binary_classification"',
                )
            ),
            "[data] class_names has 1 name(s), but a binary classifier has two classes",
        ),
        (
            lambda c: c.replace("[report]", '[output]\nworkdir = "tester_project.py"\n\n[report]'),
            "[output] workdir = 'tester_project.py': ",
        ),
        (  # a directory that cannot be made (a tester's /proc/nope/run: a traceback, status 1)
            lambda c: c.replace(
                "[report]", '[output]\nworkdir = "tester_project.py/run"\n\n[report]'
            ),
            "[output] workdir: ",
        ),
        (  # a Task around another model (a tester's: every number on the page was its)
            lambda c: c.replace(
                "[report]", '[task]\nfactory = "tester_project:task_of_another_model"\n\n[report]'
            ),
            "returned a Task around a model that is not the one [model] factory built",
        ),
    ],
)
def test_a_broken_config_exits_2_with_a_clear_message(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(edit(CONFIG.format(n_loo=5)))
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    out = [] if "[output]" in message else ["--out", str(tmp_path / "w")]
    assert cli.main(["run", str(config), *out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if message.endswith(" at "):
        where = err.split(message)[1].split()[0]
        assert re.fullmatch(r".*tester_project\.py:\d+", where), err


def test_too_few_retrainings_stop_before_any_fitting(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """[retraining] n = 2 is refused by the configuration check, naming the option and the file,
    before the model is even built (it used to retrain twice, then fail to correlate)."""
    config = tmp_path / "two.toml"
    config.write_text(CONFIG.format(n_loo=2))
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("fitted before the configuration was refused")

    monkeypatch.setattr(infkit.Influence, "fit", no_fit)
    monkeypatch.setattr("infkit.retrain.leave_one_out", no_fit)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "two.toml: [retraining] n = 2 is too few" in err and "n = 0" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        ("[40]", "[report] queries index 40 is out of range [0, 40)"),
        ("[-1]", "[report] queries index -1 is negative"),
        ("[3, 3]", "[report] queries index"),
        # (the groups were checked only after the fit and the scores, without the file's name)
        ("groups", "[group_removal] groups.some index 150 is out of range [0, 150)"),
        ("options", "[influence] options: method 'exact' does not take 'tolerance'"),
        # a tester's: refused after the fit naming no key, and drawn as a table, exit 0
        ("all", "[group_removal] groups.some holds every one of the 150 training examples"),
        ("shape", "[data] image_shape = [3, 3] holds 9 numbers, and the training set's "),
        # a tester's: the run showed no detection, silently; a group's blank name, blank rows
        ("flag all", "[self_influence] flagged names every one of the 150 training examples"),
        ("no name", "[group_removal] groups has a group with an empty name"),
    ],
)
def test_bad_report_queries_stop_before_any_fitting(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    queries: str,
    message: str,
) -> None:
    """[report] queries out of range or repeated (the page would explain one example twice)
    are refused, naming the file, before the fit (they were refused only after it)."""
    config = tmp_path / "bad.toml"
    text = CONFIG.format(n_loo=5)
    if queries == "groups":
        text = text.replace("some = [0, 1, 2, 3, 4]", "some = [0, 150]")
    elif queries == "options":
        text = text.replace("l2 = 1e-2", "l2 = 1e-2\noptions = {tolerance = 1e-8}")
    elif queries == "all":
        text = text.replace("some = [0, 1, 2, 3, 4]", f"some = {list(range(150))}")
    elif queries == "shape":
        text = text.replace("image_shape = [8, 8]", "image_shape = [3, 3]")
    elif queries == "flag all":
        text = text.replace('"tester_project:bad_labels"', str(list(range(150))))
    elif queries == "no name":
        text = text.replace("some = [0, 1, 2, 3, 4]", '"" = [0, 1]')
    else:
        text = text.replace("n_queries = 2", f"queries = {queries}")
    config.write_text(text)
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("fitted before the configuration was refused")

    monkeypatch.setattr(infkit.Influence, "fit", no_fit)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"bad.toml: {message}" in err, err
    if queries == "[3, 3]":
        assert "[report] queries index 3 is given twice" in err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (  # (refused only after the factories had built and trained the model)
            lambda c: c.replace("n_queries = 2", "queries = [5, 7, 5]"),
            "[report] queries index 5 is given twice",
        ),
        (
            lambda c: c.replace("some = [0, 1, 2, 3, 4]", "some = [0, 1, 0]"),
            "[group_removal] groups.some index 0 is given twice",
        ),
        (  # (TOML's nan: parsed, then refused by Influence after the factories had run)
            lambda c: c.replace("l2 = 1e-2", "l2 = 1e-2\ndamping = nan"),
            "[influence] damping must be a finite number, got nan",
        ),
        (  # in a table: refused by the method only after the factories had run
            lambda c: c.replace(
                'method = "exact"', 'method = "ekfac"\noptions = { damping_scale = inf }'
            ),
            "[influence] options.damping_scale must be a finite number, got inf",
        ),
        (  # (refused by Influence after the model's factory had trained it)
            lambda c: c.replace("l2 = 1e-2", "l2 = 1e-2\ndamping = -1.0"),
            '[influence] damping must be >= 0 or "auto", got -1.0',
        ),
        (
            lambda c: c.replace('flagged = "tester_project:bad_labels"', "flagged = [1, 1]"),
            "[self_influence] flagged index 1 is given twice",
        ),
        (  # inside an array of a table, the key's path named
            lambda c: c.replace(
                "some = [0, 1, 2, 3, 4]", 'some = [0, 1, 2, 3, 4], "a.b" = [1, nan]'
            ),
            "[group_removal] groups['a.b'][1] must be a finite number, got nan",
        ),
        (  # 1 or more: each retraining stops before its first step
            lambda c: c.replace("n = 5", "n = 5\ntolerance = 1.0"),
            "[retraining] tolerance must be >= 0 and below 1, got 1.0",
        ),
        (  # (accepted and never shown: a regression has no classes)
            lambda c: c.replace("image_shape = [8, 8]", 'class_names = ["low", "high"]').replace(
                "[influence]", '[task]\nkind = "regression"\n\n[influence]'
            ),
            "[data] class_names names classes, and [task] kind = 'regression' has none",
        ),
    ],
)
def test_what_the_config_alone_shows_wrong_is_refused_before_any_factory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(edit(CONFIG.format(n_loo=5)))
    (tmp_path / "tester_project.py").write_text("raise RuntimeError('imported')\n")
    assert cli.main(["run", str(config), "--out", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"bad.toml: {message}" in err, err
    assert "imported" not in err


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (
            lambda c: c.replace("tester_project:splits", "tester_project:no_splits"),
            "[data] factory",
        ),
        (
            lambda c: c.replace("image_shape = [8, 8]", 'decode = "tester_project:nope"'),
            "[data] decode",
        ),
        (
            lambda c: c.replace("tester_project:bad_labels", "tester_project:no_labels"),
            "[self_influence] flagged",
        ),
    ],
)
def test_every_named_function_is_found_before_the_model_is_built(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, key: str
) -> None:
    """docs/report.md §2: a missing function stops the run before any computation (a tester's
    missing data factory, decode or flagged function was found after the model's factory had
    built and trained the model)."""
    (tmp_path / "tester_project.py").write_text(
        (project / "tester_project.py").read_text()
        + "\n\ndef model():\n    raise RuntimeError('the model factory ran')\n"
    )
    config = tmp_path / "c.toml"
    config.write_text(edit(CONFIG.format(n_loo=5)))
    assert cli.main(["run", str(config), "--out", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{key} = " in err and "has no attribute" in err, err
    assert "the model factory ran" not in err


def test_a_function_a_factory_sets_is_looked_up_where_it_is_used(
    project: Path, tmp_path: Path
) -> None:
    """Only the module and the first name of a dotted function are found before the factories
    run: a decode of a tokenizer the data factory loads (``tokenizer = None`` at import) works
    (a reviewer's run, refused by the earlier lookup)."""
    (tmp_path / "lazy.py").write_text(
        POOLED_PROJECT.replace(
            "def splits():",
            "tokenizer = None\n\n\ndef splits():\n    global tokenizer\n    tokenizer = Words()",
        )
        + "\n\nclass Words:\n    def decode(self, ids):\n        return [WORDS[i] for i in ids]\n"
    )
    config = tmp_path / "lazy.toml"
    config.write_text(
        '[model]\nfactory = "lazy:model"\n[data]\nfactory = "lazy:splits"\n'
        'decode = "lazy:tokenizer.decode"\n[influence]\nmethod = "exact"\nl2 = 1e-2\n'
        "[report]\nn_queries = 1\ntop_k = 2\n[retraining]\nn = 0\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)  # (its pooled tokens: no per-token split)
        assert cli.main(["run", str(config), "--out", str(tmp_path / "w"), "--quiet"]) == 0
    data, _ = load_results(tmp_path / "w")
    assert set(data["queries"][0]["view"]["tokens"]) <= {f"w{i}" for i in range(10)}


def test_a_factorys_own_arguments_may_hold_infinity(tmp_path: Path) -> None:
    """infkit reads no number of a factory's args: infinity there can mean "no limit", and the
    check of nan and inf everywhere else leaves them to the factory."""
    config = tmp_path / "c.toml"
    config.write_text(
        CONFIG.format(n_loo=5).replace(
            'factory = "tester_project:model"',
            'factory = "tester_project:model"\nargs = { m = inf }',
        )
    )
    assert run_config.parse(config)["model"]["args"] == {"m": float("inf")}


def test_a_range_of_one_value_reads_as_that_value() -> None:
    """ "moved 4.4-4.4 times" for one retraining (a tester's)."""
    from infkit.report.views import value_range

    assert value_range([4.41], ".1f") == "4.4" and value_range([4.41, 4.43], ".1f") == "4.4"
    assert value_range([0.5, 2.25], ".2f") == "0.50-2.25"


def test_counts_above_the_examples_there_are_are_noted(tmp_path: Path) -> None:
    """[self_influence] top above N was taken as N without a word, where top_k and n_queries
    said it; a disabled ranking says nothing."""
    from infkit.report import analysis, parse

    config = tmp_path / "many.toml"
    text = CONFIG.format(n_loo=5).replace("[self_influence]", "[self_influence]\ntop = 500")
    config.write_text(text)
    with pytest.warns(Notice, match=r"\[self_influence\] top = 500, but there are 150 training"):
        analysis._note_clamped(parse(config), 150, 40)
    config.write_text(text.replace("top = 500", "top = 500\nenabled = false"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analysis._note_clamped(parse(config), 150, 40)


def test_warnings_of_a_command_read_as_the_commands_own_lines() -> None:
    """Under python -m infkit, Python's form named runpy's frame for every warning
    ("<frozen runpy>:88: UserWarning: ..."); a command shows "infkit run: warning: ..." and
    "infkit run: notice: ...", and a recorder (pytest's, -W filters) still sees them."""
    with cli._plain_warnings("infkit run"):
        assert warnings.formatwarning("moved", UserWarning, "x.py", 1) == (
            "infkit run: warning: moved\n"
        )
        assert warnings.formatwarning("taken", Notice, "x.py", 1) == "infkit run: notice: taken\n"
        with pytest.warns(Notice, match="recorded"):
            warnings.warn("recorded", Notice, stacklevel=1)
    assert warnings.formatwarning("m", UserWarning, "x.py", 1).startswith("x.py:1: UserWarning")


def test_unconverged_retrainings_are_flagged(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Retrainings that stop short of their tolerance (here one it cannot reach in float64)
    give a warning and a page that says the correlations are not ground truth."""
    config = tmp_path / "loose.toml"
    config.write_text(
        CONFIG.format(n_loo=3).replace("n = 3", "n = 3\ntolerance = 1e-30\nmax_iter = 2")
    )
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    workdir = tmp_path / "w"
    # the three, and the retraining on all the data that their changes are measured from
    said = "3 of the 3 leave-one-out retrainings and the retraining on all the data"
    with pytest.warns(UserWarning, match=said) as caught:
        assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
    data, _ = load_results(workdir)
    late = data["retraining"]["not_converged"]
    assert len(late) == 4 and all(r["gradient_norm"] > r["target"] for r in late)
    assert [r["index"] is None for r in late].count(True) == 1
    # the largest final gradient norm is named (the page's own figure counts the removals
    # alone, and two figures read as one: a tester's)
    worst = max(late, key=lambda r: r["gradient_norm"])
    which = "on all the data" if worst["index"] is None else f"without #{worst['index']}"
    told = [str(w.message) for w in caught if "did not converge" in str(w.message)]
    assert f"{worst['gradient_norm']:.4g}, {which}, against a target" in told[0]
    page = (workdir / "report.html").read_text()
    assert f", {which}, against a target of" in page
    assert "The retrained models did not converge:" in page
    assert "3 of the 3 retrainings and the retraining on all the data" in page
    assert "not ground truth" in page and "Raise [retraining] max_iter" in page
    assert "converged" in (workdir / "loo.csv").read_text().splitlines()[0]


def test_a_model_off_its_optimum_is_said_by_the_retraining_check(
    project: Path, tmp_path: Path
) -> None:
    """A tester's: a model trained a few steps only gave a retraining check whose actual
    changes were measured from the model retrained on all the data (5.53 away) without a word
    on the console or the page, while the library warned."""
    config = tmp_path / "half.toml"
    config.write_text(
        CONFIG.format(n_loo=3).replace("tester_project:model", "tester_project:half_trained")
    )
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    workdir = tmp_path / "w"
    with pytest.warns(UserWarning, match=r"not at the optimum.*times the median leave-one-out"):
        assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
    data, _ = load_results(workdir)
    record = data["retraining"]
    assert record["start_move"] > 0 and record["start_move_ratio"] > 0.01
    assert "The model is not at its optimum:" in (workdir / "report.html").read_text()
    finished_data, _ = load_results(project / "out") if (project / "out").exists() else (None, 0)
    if finished_data is not None:  # the trained model's check says nothing of the kind
        assert finished_data["retraining"]["start_move_ratio"] < 0.01


def test_a_rerun_without_a_section_leaves_no_table_of_it(project: Path, tmp_path: Path) -> None:
    """A tester's: a rerun with the retraining check off kept the loo.csv of the earlier run
    (another model and data) beside its own tables."""
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    workdir = tmp_path / "w"
    for n, kept in ((3, True), (0, False)):
        config = tmp_path / f"n{n}.toml"
        config.write_text(CONFIG.format(n_loo=n).replace("l2 = 1e-2", f"l2 = {1e-2 + n * 1e-4}"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a model trained for another l2
            assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
        assert (workdir / "loo.csv").exists() == kept
        assert (workdir / "top_k.csv").exists() and (workdir / "self_influence.csv").exists()


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (('method = "exact"', 'method = "exakt"'), "method = 'exakt' is not a registered.*'exact'"),
        (
            ('method = "exact"', 'method = "cg"\noptions = { tolerance = 1e-6 }'),
            "'tolerance'.*'tol'",
        ),
        (("l2 = 1e-2", "l2 = -1.0"), r"l2 must be a finite number >= 0, got -1\.0"),
    ],
)
def test_the_method_its_options_and_l2_are_checked_before_any_factory(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple, said: str
) -> None:
    """A tester's: these stopped a run only after the model factory had run (17-20 s there);
    here the model factory raises if it is called at all."""
    config = tmp_path / "bad.toml"
    text = CONFIG.format(n_loo=3).replace("tester_project:model", "tester_project:raises")
    config.write_text(text.replace(*change))
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    assert cli.main(["run", str(config), "--out", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.search(said, err) and "data server is down" not in err, err


def test_factory_arguments_it_does_not_take_are_named(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tester's: a misspelt [model] args key raised TypeError placed at infkit's own line."""
    config = tmp_path / "args.toml"
    config.write_text(
        CONFIG.format(n_loo=3).replace(
            'factory = "tester_project:model"',
            'factory = "tester_project:model"\nargs = { sed = 1 }',
        )
    )
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    assert cli.main(["run", str(config), "--out", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot be called with [model] args ['sed']" in err and "unexpected keyword" in err


def test_a_method_the_project_registers_is_found_before_any_factory_runs(
    project: Path, tmp_path: Path
) -> None:
    """A reviewer's: the early check of the method's name refused a method that the project's
    own module registers (docs/architecture.md allows it); it now imports the factory modules
    (without calling them) before it refuses."""
    from infkit.methods import base

    module = (project / "tester_project.py").read_text() + (
        "\n\nfrom infkit.methods import registered\nfrom infkit.methods.base import register"
        "\n\n\n@register\nclass ProjectExact(registered()['exact']):\n"
        "    name = 'project-exact'\n"
    )
    (tmp_path / "tester_project.py").write_text(module)
    config = tmp_path / "own.toml"
    config.write_text(CONFIG.format(n_loo=0).replace('"exact"', '"project-exact"'))
    try:
        assert cli.main(["run", str(config), "--out", str(tmp_path / "w"), "--quiet"]) == 0
    finally:
        base._REGISTRY.pop("project-exact", None)


def test_converged_retrainings_are_not_flagged(project: Path, finished: Path) -> None:
    """A convex model under ``exact``: every retraining converged, and each moved the
    parameters along the estimator's step by about its length (loo.csv, against a dense
    float64 solve of the step and a retraining of our own), so none is told apart as having
    left the linear regime."""
    data, _ = load_results(finished)
    assert data["retraining"]["not_converged"] == []
    assert data["retraining"]["moved_far"] == []
    page = (finished / "report.html").read_text()
    assert "did not converge" not in page and "left the linear regime" not in page
    with (finished / "loo.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    # ground truth: the IF step (1/N) H^-1 (grad l_j + l2 theta) from the dense Hessian of the
    # objective, and the change of a retraining without j, each computed here
    inf, _ = _reference(project)
    model = inf.task.model
    X, y = inf.fitted.train.collated()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def losses(flat: torch.Tensor) -> torch.Tensor:
        params, at = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[at : at + shape.numel()].reshape(shape)
            at += shape.numel()
        out = torch.func.functional_call(model, params, (X,))
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    n = len(y)
    l2 = inf.l2
    H = torch.func.hessian(lambda t: losses(t).mean())(theta) + l2 * torch.eye(len(theta))
    for row in rows:
        j = int(row["train_index"])
        v = torch.func.grad(lambda t, j=j: losses(t)[j])(theta) + l2 * theta
        step = torch.linalg.solve(H, v) / n
        keep = torch.tensor([i for i in range(n) if i != j])
        retrained = copy.deepcopy(model)
        infkit.train_to_optimum(infkit.Task.classification(retrained), (X[keep], y[keep]), l2)
        change = torch.cat([p.detach().reshape(-1) for p in retrained.parameters()]) - theta
        moved = float(change.norm() / step.norm())
        cosine = float(change @ step / (change.norm() * step.norm()))
        assert float(row["moved"]) == pytest.approx(moved, rel=1e-5), row
        assert float(row["cosine"]) == pytest.approx(cosine, abs=1e-6), row
        # removing one of 150 examples of a convex objective: the retraining follows the
        # Newton step on the retained objective (its dense Hessian, here), longer than the IF
        # step by about 1/(1 - h_j), the leverage first order leaves out: the report's figures
        # are that step's, to the objective's third-order terms
        retained = lambda t, j=j: (losses(t).sum() - losses(t)[j]) / (n - 1) + l2 / 2 * t @ t  # noqa: E731
        newton = -torch.linalg.solve(
            torch.func.hessian(retained)(theta), torch.func.grad(retained)(theta)
        )
        assert float(row["moved"]) == pytest.approx(float(newton.norm() / step.norm()), rel=0.03)
        newton_cosine = float(newton @ step / (newton.norm() * step.norm()))
        assert float(row["cosine"]) == pytest.approx(newton_cosine, abs=3e-3), row


def test_the_retraining_check_runs_with_untracked_layers(project: Path, tmp_path: Path) -> None:
    """EK-FAC attributes through the Linear layers only: the step covers those, the
    retrainings every parameter (LayerNorm's too); compared over the attributed ones."""
    config = tmp_path / "c.toml"
    text = CONFIG.format(n_loo=3).replace("tester_project:model", "tester_project:normed")
    config.write_text(text.replace('method = "exact"', 'method = "ekfac"\ndamping = 1e-3'))
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    workdir = tmp_path / "w"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
    with (workdir / "loo.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert all(float(r["moved"]) > 0 for r in rows), rows


def test_relatif_as_the_estimator_is_refused_before_any_factory(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """estimator = "relatif" ran, and the page showed RelatIF's scores as IF's (its lists
    labelled "if", its self-influence under the loss's caption, "predicted changes of the
    measured quantity"): RelatIF predicts no change. The estimators a report is of are if, rif
    and newton, as --help says; RelatIF is beside IF in every report."""
    config = tmp_path / "c.toml"
    config.write_text(
        CONFIG.format(n_loo=3).replace("l2 = 1e-2", 'l2 = 1e-2\nestimator = "relatif"')
    )
    # a factory that would fail: the refusal comes before any is called
    (tmp_path / "tester_project.py").write_text("raise RuntimeError('imported')\n")
    assert cli.main(["run", str(config), "--out", str(tmp_path / "w"), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "[influence] estimator = 'relatif' is not one of if, rif, newton" in message
    assert "RelatIF is shown beside IF in every report" in message
    assert not (tmp_path / "w").exists()


def test_retrainings_that_leave_the_linear_regime_are_told_apart(
    project: Path, tmp_path: Path
) -> None:
    """A tanh MLP: some retrainings move the parameters several times as far as the
    estimator's step, in another direction. Those rows (moved >= 3 or cosine < 0.5, measured
    from the retrained parameters) are named in a warning and on the page, with the
    correlation over the others."""
    config = tmp_path / "mlp.toml"
    config.write_text(CONFIG.format(n_loo=8).replace("tester_project:model", "tester_project:mlp"))
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    workdir = tmp_path / "w"
    with pytest.warns(UserWarning, match="leave-one-out retrainings .* moved the parameters"):
        assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
    data, _ = load_results(workdir)
    with (workdir / "loo.csv").open() as f:
        rows = list(csv.DictReader(f))
    far = {
        int(r["train_index"]) for r in rows if float(r["moved"]) >= 3.0 or float(r["cosine"]) < 0.5
    }
    assert far and len(far) < len(rows)
    assert {r["index"] for r in data["retraining"]["moved_far"]} == far
    page = (workdir / "report.html").read_text()
    assert "Retrainings that left the linear regime" in page
    # retrainings that stop short are told apart too, marked so (a tester's float32 ones, all
    # stopped at its precision, moved 6.7-8.9 times the step, said only as "raise max_iter")
    config.write_text(
        config.read_text().replace("n = 8", "n = 8\ntolerance = 1e-30\nmax_iter = 400")
    )
    workdir = tmp_path / "late"
    with pytest.warns(UserWarning, match=r"moved the parameters") as said:
        assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
    data, _ = load_results(workdir)
    assert all(not r["converged"] for r in data["retraining"]["moved_far"])
    assert {r["index"] for r in data["retraining"]["moved_far"]} == far
    told = [str(w.message) for w in said if "(not converged)" in str(w.message)]
    assert told and "a retraining stopped short of its optimum" in told[0]
    page = (workdir / "report.html").read_text()
    assert " (not converged)" in page and "a retraining stopped short of its optimum" in page


def test_a_refit_names_the_settings_that_changed(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run with another damping, batch size and RelatIF normalisation says which
    settings differ from the saved influence's, with both values, before fitting again."""
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    first = CONFIG.format(n_loo=0)
    (tmp_path / "a.toml").write_text(first)
    (tmp_path / "b.toml").write_text(
        first.replace("l2 = 1e-2", 'l2 = 1e-2\ndamping = 1e-3\nbatch_size = 32\nrelatif = "loss"')
    )
    workdir = str(tmp_path / "w")
    assert cli.main(["run", str(tmp_path / "a.toml"), "--out", workdir, "--quiet"]) == 0
    with pytest.warns(Notice, match="other settings") as caught:
        assert cli.main(["run", str(tmp_path / "b.toml"), "--out", workdir, "--quiet"]) == 0
    (message,) = [str(w.message) for w in caught if "other settings" in str(w.message)]
    assert "batch_size: 64 saved, 32 now" in message
    assert "damping: 0.0 saved, 0.001 now" in message
    assert "relatif: 'theta' saved, 'loss' now" in message
    assert message.count(" saved, ") == 3  # nothing else is named
    assert load_results(workdir)[0]["summary"]["influence"] == "fitted"
    # the same config again reloads that fit: the notice about refitting was the run's, not
    # the fit's, so the page does not list it as the saved fit's
    assert cli.main(["run", str(tmp_path / "b.toml"), "--out", workdir, "--quiet"]) == 0
    data = load_results(workdir)[0]
    assert data["origin"] == "reloaded"
    assert not any("other settings" in w["message"] for w in data["warnings"]), data["warnings"]
    # other data: said without the library's remedy (no train= to leave out in a run)
    (tmp_path / "c.toml").write_text(
        (tmp_path / "b.toml")
        .read_text()
        .replace('"tester_project:splits"', '"tester_project:splits"\nargs = { n_train = 140 }')
    )
    with pytest.warns(Notice, match="not reusing the saved influence") as caught:
        assert cli.main(["run", str(tmp_path / "c.toml"), "--out", workdir, "--quiet"]) == 0
    (message,) = [str(w.message) for w in caught if "not reusing" in str(w.message)]
    assert "the training data differs from the data" in message and "(140 examples" in message
    assert "train" + "=" not in message and "leave train out" not in message, message
    # another model: the same, without "load it with the model it was fitted with"
    (tmp_path / "d.toml").write_text(
        (tmp_path / "c.toml").read_text().replace("tester_project:model", "tester_project:mlp")
    )
    with pytest.warns(Notice, match="not reusing the saved influence") as caught:
        assert cli.main(["run", str(tmp_path / "d.toml"), "--out", workdir, "--quiet"]) == 0
    (message,) = [str(w.message) for w in caught if "not reusing" in str(w.message)]
    assert "was saved for another model or task" in message and "Load it with" not in message


def test_a_rerun_stopped_before_its_results_leaves_the_last_runs_files_together(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tester killed a rerun with another damping during its retrainings: config.toml and
    settings.json said the new damping beside the old run's tables and page. They are written
    with the tables once the results are committed: a rerun stopped before leaves the last
    finished run's files, every one of them; the files are readable as a plain write's are."""
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    first = CONFIG.format(n_loo=3)
    (tmp_path / "a.toml").write_text(first)
    (tmp_path / "b.toml").write_text(first.replace("l2 = 1e-2", "l2 = 1e-2\ndamping = 1e-3"))
    workdir = tmp_path / "w"
    assert cli.main(["run", str(tmp_path / "a.toml"), "--out", str(workdir), "--quiet"]) == 0
    written = ["config.toml", "settings.json", "top_k.csv", "loo.csv", "report.html"]
    before = {name: (workdir / name).read_bytes() for name in written}
    mask = os.umask(0o022)
    os.umask(mask)
    # every file as a plain open() would make it (a tester's safetensors files were 0600)
    modes = {p.relative_to(workdir): p.stat().st_mode & 0o777 for p in workdir.rglob("*")}
    files = {p: m for p, m in modes.items() if (workdir / p).is_file()}
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p: m for p, m in files.items() if m != 0o666 & ~mask} == {}

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as a kill during the retrainings

    monkeypatch.setattr(infkit.retrain, "leave_one_out", stopped)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.main(["run", str(tmp_path / "b.toml"), "--out", str(workdir), "--quiet"])
    assert {name: (workdir / name).read_bytes() for name in written} == before
    monkeypatch.undo()
    # a tester's: stopped while its page rendered, after its results were committed, the rerun
    # had replaced top_k.csv and config.toml beside the last run's page: they are written in a
    # folder of their own and moved in at the end
    from infkit.report import html

    def render_stopped(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt  # as a kill while the page renders

    monkeypatch.setattr(html, "render", render_stopped)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.main(["run", str(tmp_path / "b.toml"), "--out", str(workdir), "--quiet"])
    assert {name: (workdir / name).read_bytes() for name in written} == before
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["run", str(tmp_path / "b.toml"), "--out", str(workdir), "--quiet"]) == 0
    assert b"damping = 1e-3" in (workdir / "config.toml").read_bytes()
    assert not (workdir / ".infkit-outputs").exists()  # (the stopped run's folder removed)


def test_a_run_killed_after_its_fit_resumes_from_the_committed_factors(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A tester's language-model run killed 12 s into its EK-FAC fit left the workdir empty,
    and a kill after it refitted everything: influence/ is saved only once the fit is done.
    A method that commits its work (the Kronecker methods' factors, score shards) now does so
    in the workdir's infkit-partial/ as the run goes: the rerun fits no factors and gives the scores
    of a run never stopped; what another computation's killed run left there is removed, said;
    a finished run leaves no infkit-partial/."""
    from infkit.kfac.factors import FactorFitter
    from infkit.report.analysis import PARTIAL

    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    text = CONFIG.format(n_loo=3).replace('method = "exact"', 'method = "ekfac"\ndamping = 1e-3')
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "b.toml").write_text(text.replace("tester_project:model", "tester_project:mlp"))
    fits: list[int] = []
    fit = FactorFitter.fit
    monkeypatch.setattr(FactorFitter, "fit", lambda *a, **k: fits.append(1) or fit(*a, **k))

    def run(config: str, workdir: Path) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return cli.main(["run", str(tmp_path / config), "--out", str(workdir), "--quiet"])
            finally:  # (a killed run's too)
                said.extend(str(w.message) for w in caught)

    said: list[str] = []
    assert run("a.toml", tmp_path / "fresh") == 0  # a run never stopped
    assert not (tmp_path / "fresh" / PARTIAL).exists()

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as a kill between the fit and its save

    workdir = tmp_path / "w"
    for config in ("b.toml", "a.toml"):  # another computation's leftovers, then this one's
        monkeypatch.setattr(infkit.Influence, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            run(config, workdir)
        monkeypatch.undo()
        monkeypatch.setattr(FactorFitter, "fit", lambda *a, **k: fits.append(1) or fit(*a, **k))
        assert not (workdir / "influence").exists()
        assert any(p.name.startswith("kronecker-factors") for p in (workdir / PARTIAL).iterdir())
    # a's run found b's factors there: removed, said, and a fitted afresh
    told = [m for m in said if m.startswith(f"not resuming from {workdir / PARTIAL}: it holds")]
    assert len(told) == 1, said
    assert "(differs in: model.architecture" in told[0] and "overwrite" not in told[0]
    fits.clear()
    said.clear()
    assert run("a.toml", workdir) == 0
    assert fits == []  # the factors committed before the kill, read back
    assert not (workdir / PARTIAL).exists()
    _, resumed = load_results(workdir)
    _, fresh = load_results(tmp_path / "fresh")
    torch.testing.assert_close(resumed["scores"], fresh["scores"], rtol=1e-10, atol=0)
    # b's factors, left by its killed run, were found by a's killed run and removed, said
    monkeypatch.setattr(infkit.Influence, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        run("b.toml", workdir)
    monkeypatch.undo()
    monkeypatch.setattr(FactorFitter, "fit", lambda *a, **k: fits.append(1) or fit(*a, **k))
    fits.clear()
    said.clear()
    assert run("a.toml", workdir) == 0  # influence/ holds a's fit: b's leftovers are not read
    assert not (workdir / PARTIAL).exists() and fits == []
    _, again = load_results(workdir)
    torch.testing.assert_close(again["scores"], fresh["scores"], rtol=1e-10, atol=0)
    # said when found, not kept with the fit's warnings: a reloaded run does not repeat it
    said.clear()
    assert run("a.toml", workdir) == 0
    assert not [m for m in said if "not resuming" in m], said
    # influence/ is saved without the run's infkit-partial/: a library load of it scores nowhere
    # else (a reviewer's load wrote shards into the removed, or another machine's, path)
    inf, _ = _reference(project, method="ekfac", damping=1e-3)
    loaded = infkit.Influence.load(workdir / "influence", inf.task)
    assert loaded.workdir is None
    # a place the options name is the user's: never emptied, even one named partial (a
    # reviewer's notes and another model's factors there were removed)
    own = tmp_path / "mine" / PARTIAL
    for name in ("a", "b"):
        options = f'options = {{ workdir = "{own}" }}\n'
        config = (
            (tmp_path / f"{name}.toml")
            .read_text()
            .replace("damping = 1e-3\n", "damping = 1e-3\n" + options)
        )
        (tmp_path / f"{name}-own.toml").write_text(config)
    assert run("b-own.toml", tmp_path / "w2") == 0
    (own / "notes.txt").write_text("mine")
    kept = sorted(p.name for p in own.iterdir())
    capsys.readouterr()
    assert run("a-own.toml", tmp_path / "w2") == 2
    assert "holds Kronecker factors fitted for another computation" in capsys.readouterr().err
    assert sorted(p.name for p in own.iterdir()) == kept
    # nor a folder named partial in the workdir that infkit did not write (a reviewer's
    # chapter1.txt was removed), with reuse on or off: refused, naming it
    for config, text in (("a.toml", ""), ("a-noreuse.toml", "reuse = false\n")):
        if text:
            body = (tmp_path / "a.toml").read_text()
            (tmp_path / config).write_text(body.replace("[influence]\n", "[influence]\n" + text))
        user = tmp_path / "w3" / PARTIAL
        user.mkdir(parents=True, exist_ok=True)
        (user / "chapter1.txt").write_text("draft")
        assert run(config, tmp_path / "w3") == 2
        err = capsys.readouterr().err
        assert f"{user} holds files infkit did not write (chapter1.txt)" in err, err
        assert (user / "chapter1.txt").read_text() == "draft"
    # the identity of infkit-partial/ holds the task: a killed run's factors under another loss are
    # removed, said, where the library's refusal (overwrite=True) stopped every rerun
    (tmp_path / "tasks_extra.py").write_text(
        "import torch.nn.functional as F\nimport infkit\n\n\ndef smoothed(model):\n"
        "    return infkit.Task(model, lambda o, t: F.cross_entropy(o, t, reduction='none', "
        "label_smoothing=0.1))\n"
    )
    body = (tmp_path / "a.toml").read_text()
    (tmp_path / "t.toml").write_text(body + '\n[task]\nfactory = "tasks_extra:smoothed"\n')
    monkeypatch.setattr(infkit.Influence, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        run("a.toml", tmp_path / "w4")
    monkeypatch.undo()
    said.clear()
    assert run("t.toml", tmp_path / "w4") == 0, capsys.readouterr().err
    told = [m for m in said if m.startswith("not resuming from")]
    assert len(told) == 1 and "task." in told[0], said
    # a finished run removes a stopped run's infkit-partial/ whatever its own method
    monkeypatch.setattr(infkit.Influence, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        run("a.toml", tmp_path / "w5")
    monkeypatch.undo()
    assert (tmp_path / "w5" / PARTIAL).is_dir()
    (tmp_path / "exact.toml").write_text(CONFIG.format(n_loo=3))
    assert run("exact.toml", tmp_path / "w5") == 0
    assert not (tmp_path / "w5" / PARTIAL).exists()
    # a project's own partial/ is none of the run's (a reviewer's ekfac runs stopped there),
    # and a folder of the run's name holding only a hidden file is not the run's either (a
    # reviewer's .gitkeep was removed at the end of an exact run)
    project_own = tmp_path / "w6" / "partial"
    project_own.mkdir(parents=True)
    (project_own / "shard0.txt").write_text("mine")
    assert run("a.toml", tmp_path / "w6") == 0
    assert (project_own / "shard0.txt").read_text() == "mine"
    hidden = tmp_path / "w7" / PARTIAL
    hidden.mkdir(parents=True)
    (hidden / ".gitkeep").write_text("")
    assert run("exact.toml", tmp_path / "w7") == 0
    assert (hidden / ".gitkeep").exists()


def test_every_key_is_documented_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    for section, keys in run_config.SCHEMA.items():
        assert f"[{section}]" in text
        for key, spec in keys.items():
            assert key in text and spec.doc.split()[0] in text


def test_every_key_is_in_the_docs_table() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "report.md").read_text()
    for section, keys in run_config.SCHEMA.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `[{section}]` |"))
        for key in keys:
            assert f"`{key}`" in row, (section, key)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.toml"
    bad.write_text("[model\nfactory=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        run_config.parse(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        run_config.parse(tmp_path / "none.toml")


def test_report_of_a_folder_without_results(tmp_path: Path, capsys) -> None:
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no finished infkit run" in capsys.readouterr().err


TEXT_PROJECT = textwrap.dedent(
    """
    import torch
    import infkit
    from infkit import language_modeling as lm

    WORDS = ["<pad>", "a", "b", "c", "d", "e", "f", "g"]

    def splits():
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, len(WORDS), (48, 6), generator=g)
        return lm.examples(ids[:40]), lm.examples(ids[40:], prompt_lengths=[2] * 8)

    def decode(ids):
        return [WORDS[i] for i in ids]

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(len(WORDS), 8)
            self.out = torch.nn.Linear(8, len(WORDS))

        def forward(self, input_ids, attention_mask=None):
            return self.out(torch.tanh(self.embed(input_ids)))

    def model():
        torch.manual_seed(0)
        return Bigram().double()

    LENGTH = 8

    def _left_padded(ids, pads):
        mask = torch.ones_like(ids)
        for i, p in enumerate(pads):
            ids[i, :p] = 0
            mask[i, :p] = 0
        return lm.examples(ids, mask)

    def padded_splits():
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, len(WORDS), (40, LENGTH), generator=g)
        train = _left_padded(ids[:32], [i % 3 for i in range(32)])
        # test examples 0-3 unpadded, 4-7 left-padded by 1-4 tokens
        test = _left_padded(ids[32:], [0, 0, 0, 0, 1, 2, 3, 4])
        return train, test

    class LearnedPositions(Bigram):
        # positions counted from column 0: left padding moves every real token's position
        def __init__(self):
            super().__init__()
            self.position = torch.nn.Embedding(LENGTH, 8)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1]))
            return self.out(torch.tanh(h))

    def positions_model():
        torch.manual_seed(0)
        return LearnedPositions().double()
    """
)


def text_project(
    folder: Path,
    *,
    model: str = "model",
    splits: str = "splits",
    decode: str = "decode",
    more: str = "",
    settings: str = '[influence]\nmethod = "kfac"\ndamping = 1e-3\n',
    module: str = "text_project",
) -> Path:
    """Write TEXT_PROJECT (with ``more`` code) as ``module``.py in ``folder`` and a language
    model config naming its factories, then ``settings``; returns the config's path."""
    (folder / f"{module}.py").write_text(TEXT_PROJECT + more)
    config = folder / "infkit.toml"
    config.write_text(
        f'[model]\nfactory = "{module}:{model}"\n'
        f'[data]\nfactory = "{module}:{splits}"\ndecode = "{module}:{decode}"\n'
        '[task]\nkind = "language_modeling"\n' + settings
    )
    return config


def run_text_project(folder: Path, settings: str) -> tuple[Path, dict, dict]:
    """:func:`text_project` with ``settings``, run by ``infkit run`` (it must succeed): the
    workdir, the report data and tensors."""
    config = text_project(folder, settings=settings)
    assert cli.main(["run", str(config), "--quiet"]) == 0
    workdir = folder / "runs" / "infkit"
    data, tensors = load_results(workdir)
    return workdir, data, tensors


def test_text_with_per_token_scores(tmp_path: Path) -> None:
    """A language model: texts shown token by token, each listed sequence's per-token scores
    sum to its score (the per-token split is exact for a model whose only tracked layer acts
    position by position, with l2 = 0)."""
    _, data, _ = run_text_project(
        tmp_path,
        '[influence]\nmethod = "kfac"\ndamping = 1e-3\n[report]\nn_queries = 1\ntop_k = 3\n',
    )
    assert data["display_kind"] == "text"
    query = data["queries"][0]
    assert query["view"]["scored"][:2] == [False, False]  # the prompt is not scored
    for item in query["lists"]["if"]["proponent"] + query["lists"]["if"]["opponent"]:
        tokens = item["view"]["tokens"]
        assert set(tokens) <= {"a", "b", "c", "d", "e", "f", "g"}
        assert sum(item["view"]["token_scores"]) == pytest.approx(item["score"], rel=1e-9)
    page = (tmp_path / "runs" / "infkit" / "report.html").read_text()
    assert 'class="tok"' in page and "rgba(" in page


POOLED_PROJECT = """
import torch

import infkit

WORDS = [f"w{i}" for i in range(10)]


def splits():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 10, (36, 6), generator=g)
    y = ((ids < 5).sum(1) > 3).long()
    return (ids[:28], y[:28]), (ids[28:], y[28:])


def decode(ids):
    return [WORDS[i] for i in ids]


class Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(torch.tanh(self.embed(ids)).mean(1))


def model():
    torch.manual_seed(0)
    net = Bag().double()
    infkit.train_to_optimum(infkit.Task.classification(net), splits()[0], 1e-2)
    return net
"""


def test_a_classifier_that_pools_its_tokens_is_shown_without_a_per_token_split(
    tmp_path: Path,
) -> None:
    """Token ids shown as text, a classifier whose layers act after the sequence is pooled: the
    per-token split has one position per example for six tokens (a tester's run stopped on an
    IndexError). The run finishes with the lists as the API ranks them, no token scores, and a
    notice saying why."""
    (tmp_path / "pooled.py").write_text(POOLED_PROJECT)
    config = tmp_path / "pooled.toml"
    config.write_text(
        '[model]\nfactory = "pooled:model"\n[data]\nfactory = "pooled:splits"\n'
        'decode = "pooled:decode"\n[influence]\nmethod = "exact"\nl2 = 1e-2\n'
        "[report]\nn_queries = 1\ntop_k = 3\n[retraining]\nn = 0\n"
    )
    workdir = tmp_path / "w"
    with pytest.warns(Notice, match=r"the per-token split finds 1 position\(s\) per example"):
        assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
    data, tensors = load_results(workdir)
    assert any("per-token split finds 1" in w["message"] for w in data["warnings"])  # on the page
    assert data["display_kind"] == "text"
    query = data["queries"][0]
    items = query["lists"]["if"]["proponent"] + query["lists"]["if"]["opponent"]
    assert items and all("token_scores" not in item["view"] for item in items)
    for item in items:
        assert item["score"] == pytest.approx(float(tensors["scores"][0, item["index"]]), rel=1e-12)


def test_lists_keep_their_sign_and_tokens_add_up_with_the_rest(tmp_path: Path) -> None:
    """top_k above N: each list holds the examples of its sign only (the proponents exactly the
    training examples with a positive score, ranked by it), the CSV's kinds agree with the
    signs, and a notice says top_k was taken as N. Under ``exact`` with l2 > 0 the per-token
    split leaves the regulariser's share out of the tokens: each sequence's shown tokens plus
    its rest add up to its score (token_scores against scores, two computations), the rest is
    not 0 and the page shows it."""
    workdir, data, tensors = run_text_project(
        tmp_path,
        '[influence]\nmethod = "exact"\nl2 = 0.1\ndamping = 1e-3\n'
        "[self_influence]\nenabled = false\n[report]\nn_queries = 2\ntop_k = 41\n",
    )
    said = [w["message"] for w in data["warnings"]]
    assert any("[report] top_k = 41, but there are 40 training examples" in m for m in said), said
    rests = []
    for q, query in enumerate(data["queries"]):
        for name, ranked in query["lists"].items():
            truth = tensors["scores" if name == "if" else "relatif_scores"][q]
            pro = [item["index"] for item in ranked["proponent"]]
            con = [item["index"] for item in ranked["opponent"]]
            assert set(pro) == set((truth > 0).nonzero().reshape(-1).tolist()), name
            assert set(con) == set((truth < 0).nonzero().reshape(-1).tolist()), name
            assert pro == sorted(pro, key=lambda j: -float(truth[j]))
            assert 0 < len(pro) < 40 and 0 < len(con) < 40  # both signs occur here
        for item in query["lists"]["if"]["proponent"] + query["lists"]["if"]["opponent"]:
            view = item["view"]
            total = sum(view["token_scores"]) + view["token_rest"]
            assert total == pytest.approx(item["score"], rel=1e-9, abs=1e-12)
            rests.append(abs(view["token_rest"]) / abs(item["score"]))
    assert max(rests) > 1e-3  # the regulariser's share is in the rest
    with (workdir / "top_k.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all((float(r["score"]) > 0) == (r["kind"] == "proponent") for r in rows)
    page = (workdir / "report.html").read_text()
    assert "rest (not by position)" in page


def test_the_token_split_of_lists_by_another_estimator_is_said_to_be_ifs(tmp_path: Path) -> None:
    """Lists by the Newton estimator: the per-token split is IF's, whose tokens and rest add up
    to the IF score, not to the listed one, and the page says whose split it is."""
    workdir, data, _ = run_text_project(
        tmp_path,
        '[influence]\nmethod = "exact"\nestimator = "newton"\nl2 = 0.1\n'
        "[self_influence]\nenabled = false\n[report]\nn_queries = 1\ntop_k = 3\n",
    )
    query = data["queries"][0]
    items = query["lists"]["if"]["proponent"] + query["lists"]["if"]["opponent"]
    assert items
    for item in items:
        view = item["view"]
        assert view["token_estimator"] == "if"
        total = sum(view["token_scores"]) + view["token_rest"]
        assert total == pytest.approx(view["token_total"], rel=1e-9, abs=1e-12)
    page = (workdir / "report.html").read_text()
    shown = page.count("IF&#x27;s split: tokens sum") + page.count("IF's split: tokens sum")
    assert shown == len(items), shown
    # top_k.csv names the lists' estimator (a tester's rif run read "if" there)
    with (workdir / "top_k.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["estimator"] for r in rows} == {"newton", "relatif"}
    listed = {
        (int(r["train_index"]), float(r["score"])) for r in rows if r["estimator"] != "relatif"
    }
    assert listed == {(item["index"], item["score"]) for item in items}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("decode(ids)[:-1]", "[data] decode returned 5 strings for 6 token ids"),
        ('" ".join(decode(ids))', "[data] decode returned one string for the whole sequence"),
    ],
)
def test_a_decode_that_does_not_fit_stops_before_any_fitting(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    body: str,
    message: str,
) -> None:
    text_project(
        tmp_path,
        decode="short_decode",
        more=f"\ndef short_decode(ids):\n    return {body}\n",
        settings="",
    )

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("fitted before the configuration was refused")

    monkeypatch.setattr(infkit.Influence, "fit", no_fit)
    assert cli.main(["run", str(tmp_path / "infkit.toml"), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_token_inputs_shown_as_images_stop_before_any_fitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tester's: [data] kind = "image" on token ids raised a raw TypeError from numpy."""
    config = text_project(tmp_path, settings="")
    config.write_text(config.read_text().replace("[data]\n", '[data]\nkind = "image"\n'))

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("fitted before the configuration was refused")

    monkeypatch.setattr(infkit.Influence, "fit", no_fit)
    assert cli.main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "[data] kind = 'image', but an example's inputs are a dict of ['input_ids']" in err


def test_two_projects_with_a_module_of_the_same_name_in_one_process(tmp_path: Path) -> None:
    """Each config's factories come from its own folder: the second project's ``project.py``
    is not the first one's, already imported (its data would be used without a word)."""
    import warnings

    sized = textwrap.dedent(
        """
        def sized_splits():
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(1, len(WORDS), (SIZE + 4, 6), generator=g)
            return lm.examples(ids[:SIZE]), lm.examples(ids[SIZE:])
        """
    )
    sizes = {}
    for name, size in (("first", 20), ("second", 30)):
        folder = tmp_path / name
        folder.mkdir()
        text_project(
            folder,
            module="project",
            splits="sized_splits",
            more=sized + f"\nSIZE = {size}\n",
            settings='[influence]\nmethod = "kfac"\ndamping = 1e-3\n'
            "[report]\nn_queries = 1\ntop_k = 2\n[retraining]\nn = 0\n",
        )
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert cli.main(["run", str(folder / "infkit.toml"), "--quiet"]) == 0
        # the first project's module was infkit's import: replaced without a word
        assert not any("replaced in sys.modules" in str(w.message) for w in record)
        data, _ = load_results(folder / "runs" / "infkit")
        sizes[name] = data["summary"]["n_train"]
    assert sizes == {"first": 20, "second": 30}
    # a module of that name the user imported is replaced too, with a notice naming both
    import importlib
    import sys

    own = tmp_path / "own"
    own.mkdir()
    (own / "project.py").write_text("MINE = True\n")
    sys.modules.pop("project", None)
    sys.path.insert(0, str(own))
    try:
        importlib.import_module("project")
    finally:
        sys.path.remove(str(own))
    with pytest.warns(Notice, match=r"the config's folder holds its own 'project'.* replaced"):
        assert cli.main(["run", str(tmp_path / "first" / "infkit.toml"), "--quiet"]) == 0
    sys.modules.pop("project", None)


def test_groups_fall_back_to_the_run_estimator_when_newton_is_out_of_reach() -> None:
    """EK-FAC on a language model: its curvature does not hold the group's exact block that
    the Newton step would remove (the step met leverage >= 1 here, or blew up below it), so the
    report gives the run's estimator ('if': exactly the sum of the members' scores) and says
    why, instead of failing after the fit or showing a blown-up number."""
    import warnings

    from lm_helpers import LENGTH, VOCAB, TinyLM

    from infkit import language_modeling as lm
    from infkit.data import ExampleSet
    from infkit.report.analysis import _groups

    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (24, LENGTH))
    inputs, labels = lm.examples(ids, torch.ones_like(ids))
    train = ({k: v[:20] for k, v in inputs.items()}, labels[:20])
    test = ExampleSet(({k: v[20:] for k, v in inputs.items()}, labels[20:]))
    task = infkit.Task.language_modeling(TinyLM().double().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2, batch_size=4).fit(train)
    scores = inf.scores(test)
    (group,) = _groups(inf, {"first": torch.tensor([0, 1, 2])}, test, scores)
    assert group["estimator"] == "if"
    assert group["fallback"].startswith("no newton step: method 'ekfac' approximates")
    torch.testing.assert_close(
        torch.tensor(group["joint"], dtype=torch.float64),
        scores[:, :3].sum(1),
        rtol=1e-9,
        atol=1e-12,
    )
    # a method without a newton step at all says so too (the row read "if" without a note)
    plain = infkit.Influence(task, "identity", l2=1e-2).fit(train)
    (group,) = _groups(plain, {"first": torch.tensor([0, 1, 2])}, test, plain.scores(test))
    assert group["estimator"] == "if"
    assert group["fallback"].startswith("no newton step: method 'identity' does not supply one")


# ---------------------------------------------------------------------------- a real browser
def _chromium() -> str | None:
    import os

    for name in (
        os.environ.get("INFKIT_CHROMIUM"),
        "chromium",
        "chromium-browser",
        "google-chrome",
    ):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class _Page(HTMLParser):
    """The headings, images and links of a page, read without a browser."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.references: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self._in_h2 = tag == "h2"
        if tag == "h2":
            self.headings.append("")
        if tag == "img":
            self.images.append(attributes)
        self.references += [v for k, v in attrs if k in ("src", "href", "action") and v]

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headings[-1] += data


def test_a_left_padded_run_reports_its_warnings_and_shows_the_real_tokens(
    tmp_path: Path,
) -> None:
    """The padding probe's warning (padding moves this model's logits) reaches the page, once
    per set, naming the user's test example; left-padded texts show their real tokens, and the
    per-token scores of the shown tokens sum to the listed scores (only the padding is left
    out); a rerun that reloads the fit keeps the fit's warnings on the page."""
    text_project(
        tmp_path,
        model="positions_model",
        splits="padded_splits",
        settings='[influence]\nmethod = "kfac"\ndamping = 1e-3\n[report]\nqueries = [7, 6]\ntop_k = 3\n',
    )
    with pytest.warns(UserWarning, match="padding") as caught:
        assert cli.main(["run", str(tmp_path / "infkit.toml"), "--quiet"]) == 0
    workdir = tmp_path / "runs" / "infkit"
    data, _ = load_results(workdir)
    said = [w["message"] for w in data["warnings"]]
    console = {str(w.message) for w in caught}
    assert set(said) <= console and len(said) == len(set(said))
    padded = [m for m in said if "padding" in m]
    # the test set is probed once, as a whole (its first left-padded example, 4), not again as
    # the report's queries [7, 6]: a subset of it; and the training set once
    assert [m for m in padded if m.startswith("test set")] == [
        m for m in padded if m.startswith("test set example 4: its 1 padding positions")
    ]
    assert len([m for m in padded if m.startswith("test set")]) == 1, padded
    assert len([m for m in padded if m.startswith("training set example 1:")]) == 1, padded
    assert not any("deprecated" in m for m in said)  # warnings about code are left out
    assert not any(m.startswith("test set example 0") for m in said), said
    query = data["queries"][0]
    assert query["index"] == 7
    import importlib
    import sys
    import warnings

    sys.path.insert(0, str(tmp_path))
    try:
        project = importlib.import_module("text_project")
        _, (test_inputs, _) = project.padded_splits()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("text_project", None)
    real = test_inputs["input_ids"][7, 4:].tolist()
    assert query["view"]["tokens"] == project.decode(real)
    assert query["view"]["positions"] == [4, 5, 6, 7]
    for item in query["lists"]["if"]["proponent"] + query["lists"]["if"]["opponent"]:
        view = item["view"]
        assert "<pad>" not in view["tokens"]
        assert len(view["token_scores"]) == len(view["tokens"]) == len(view["positions"])
        assert sum(view["token_scores"]) == pytest.approx(item["score"], rel=1e-9)
    page = (workdir / "report.html").read_text()
    assert 'class="alert"' in page and "during the run" in page
    assert page.count('class="warning"') >= len(padded)
    assert "test set example 4: its 1 padding" in page
    # run again: the saved fit is reloaded, and its warnings (not given again) stay on the page
    fit_said = [m for m in said if m.startswith("training set") or "leaves 2 trainable" in m]
    assert len(fit_said) == 2, said
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["run", str(tmp_path / "infkit.toml"), "--quiet"]) == 0
    again, _ = load_results(workdir)
    assert again["origin"] == "reloaded"
    reloaded = {w["message"]: w.get("from") for w in again["warnings"]}
    assert all(reloaded.get(m) == "the saved fit" for m in fit_said), again["warnings"]
    assert "(given by the saved fit)" in (workdir / "report.html").read_text()


def test_report_renders_in_headless_chromium(finished: Path) -> None:
    """The page read as HTML (always): every section heading, every image a PNG data URI that
    decodes, no reference outside the file. Then opened in Chromium (when it and playwright
    are installed; .ci/run installs Chromium where it can, and a warning says what was not
    checked otherwise): headings in the DOM, thumbnails and figures decoded, no console error,
    no request but the file itself, a screenshot that is not blank."""
    import base64
    import importlib.util
    import io
    import warnings

    from matplotlib.image import imread

    from infkit.report.html import SECTIONS

    page_text = (finished / "report.html").read_text()
    parsed = _Page()
    parsed.feed(page_text)
    assert parsed.headings == [title for _, title in SECTIONS]
    assert len(parsed.images) >= 2 * (1 + 16) + 3
    for image in parsed.images:
        src = image["src"] or ""
        assert src.startswith("data:image/png;base64,"), src[:40]
        pixels = imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert pixels.shape[0] > 0 and pixels.shape[1] > 0
    assert all(ref.startswith(("data:", "#")) for ref in parsed.references), parsed.references

    browser_path = _chromium()
    if browser_path is None or importlib.util.find_spec("playwright") is None:
        warnings.warn(
            "report.html checked as HTML only: Chromium or playwright is not installed "
            "(apt-get install chromium; .ci/run does it), so the browser checks did not run",
            UserWarning,
            stacklevel=1,
        )
        return
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((finished / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        headings = page.evaluate("[...document.querySelectorAll('h2')].map(h => h.textContent)")
        images = page.evaluate(
            "[...document.images].map(i => [i.className, i.complete && i.naturalWidth > 0])"
        )
        shot = page.screenshot()
        browser.close()
    assert headings == [title for _, title in SECTIONS]
    thumbs = [ok for cls, ok in images if "thumb" in cls]
    figures = [ok for cls, ok in images if cls == "figure"]
    # 2 queries x (the query + 2 lists x 2 kinds x 4), and the self-influence table
    assert len(thumbs) >= 2 * (1 + 16) and all(thumbs)
    assert len(figures) >= 3 and all(figures)
    assert errors == []
    assert requests and all(url.startswith(("file:", "data:")) for url in requests), requests
    pixels = imread(io.BytesIO(shot))[..., :3]
    assert pixels.std() > 0.05  # not blank
    assert (pixels.mean(-1) < 0.5).mean() > 0.01  # text and images drawn


def test_an_iterative_method_is_told_to_solve_per_training_example(
    project: Path, tmp_path: Path
) -> None:
    """RelatIF and self-influence by CG solve a system per training example (a tester's
    `infkit run` with cg took 291 s where the library's fit and scores took 15): the run says
    so with the pace of the queries' solves, and ranks the scores it holds instead of solving
    again (its lists are still the library's top_k)."""
    config = tmp_path / "cg.toml"
    config.write_text(
        CONFIG.format(n_loo=0).replace('method = "exact"', 'method = "cg"\ndamping = 0.1')
    )
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    out = tmp_path / "run"
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    data, tensors = load_results(out)
    told = [w["message"] for w in data["warnings"] if "per training example" in w["message"]]
    assert len(told) == 1, data["warnings"]
    # both from one solve per training example: the same numbers as the two calls apart
    shared = r"RelatIF and self-influence by 'cg' solve .* 1 x \d+ solves \(shared by both\)"
    assert re.search(shared, told[0]), told[0]
    inf, test = _reference(tmp_path, "cg", damping=0.1)
    queries = (test[0][tensors["queries"]], test[1][tensors["queries"]])
    top = inf.with_estimator("relatif").top_k(queries, k=4)
    for q, record in enumerate(data["queries"]):
        shown = [item["index"] for item in record["lists"]["relatif"]["proponent"]]
        assert shown == top.proponent_indices[q].tolist()
    alone = inf.with_estimator("relatif").scores(queries)
    torch.testing.assert_close(tensors["relatif_scores"], alone, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(tensors["self_scores"], inf.self_scores(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_tables_keep_a_regression_target_in_full(
    project: Path, tmp_path: Path, dtype: str
) -> None:
    """top_k.csv and self_influence.csv hold each training target as it is (the page shows 4
    digits: a tester's target of 1.66048 read 1.66 in the tables); read back in the target's
    precision, each label is the training target of its row's index, and a float32 target is
    written in at most the 9 significant digits float32 needs (1.66048, not 1.66048002243042)."""
    config = tmp_path / "regression.toml"
    config.write_text(
        f'[model]\nfactory = "tester_project:regressor"\nargs = {{ dtype = "{dtype}" }}\n'
        + f'[data]\nfactory = "tester_project:diabetes"\nargs = {{ dtype = "{dtype}" }}\n'
        + '[task]\nkind = "regression"\n'
        + '[influence]\nmethod = "exact"\nl2 = 1e-2\n'
        + "[report]\ntop_k = 3\nn_queries = 2\n[retraining]\nn = 0\n"
    )
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    workdir = tmp_path / "w"
    assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
    targets = _tester_module(project).diabetes(dtype)[0][1].reshape(-1)
    for table, column in (("top_k.csv", "train_index"), ("self_influence.csv", "index")):
        with (workdir / table).open() as f:
            rows = list(csv.DictReader(f))
        assert rows, table
        for row in rows:
            read = torch.tensor(float(row["label"]), dtype=targets.dtype)
            assert read == targets[int(row[column])], (table, row)
            digits = len(row["label"].lstrip("-").replace(".", "").lstrip("0").split("e")[0])
            assert digits <= (17 if dtype == "float64" else 9), row
        assert any(len(row["label"]) > 8 for row in rows)  # more than the page's 4 digits
    page = (workdir / "report.html").read_text()
    shown = float(targets[int(rows[0]["index"])])
    assert f"{shown:.4g}" in page


def _tabular_config(model: str, data: str, names: str, task: str) -> str:
    """An exact run's config on a tabular factory of the tester's project, without retraining:
    the ``model`` and ``data`` factories, the ``[data]`` lines ``names`` and the ``[task]`` line
    ``task``."""
    return (
        f'[model]\nfactory = "tester_project:{model}"\n'
        f'[data]\nfactory = "tester_project:{data}"\nkind = "tabular"\n{names}'
        f"[task]\n{task}\n"
        '[influence]\nmethod = "exact"\nl2 = 1e-2\n'
        "[report]\ntop_k = 3\nn_queries = 2\n[retraining]\nn = 0\n"
    )


def _tester_module(project: Path) -> types.ModuleType:
    """The tester's project module, imported from its file (its factories' data)."""
    spec = importlib.util.spec_from_file_location("tester_module", project / "tester_project.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_binary_classifiers_labels_are_named_and_a_tabular_page_fits_800_pixels(
    project: Path, tmp_path: Path
) -> None:
    """A binary classifier's float labels 0.0 and 1.0 showed as numbers beside a named
    prediction (a tester's "y = 0 · predicted benign"); its tables and lists name them. At 800
    pixels the tabular page scrolled sideways (840-1233 px: the self-influence table with its
    feature row spilled past its card) and long class names were cut: every table scrolls in
    its own box, and names wrap."""
    config = tmp_path / "binary.toml"
    names = ["malignant_with_a_really_really_long_name", "benign"]
    config.write_text(
        _tabular_config(
            "binary",
            "cancer",
            f"class_names = {names}\n"
            'feature_names = ["radius", "texture", "perimeter", "area", "smoothness"]\n',
            'kind = "binary_classification"',
        )
    )
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    workdir = tmp_path / "w"
    assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
    images = tmp_path / "images.toml"  # example cards, whose long class names were cut
    long = [f"digit_{c}_with_a_really_really_long_name" for c in range(10)]
    images.write_text(
        CONFIG.format(n_loo=0).replace(
            "image_shape = [8, 8]", f"image_shape = [8, 8]\nclass_names = {long}"
        )
    )
    assert cli.main(["run", str(images), "--out", str(tmp_path / "i"), "--quiet"]) == 0
    train, _ = _tester_module(project).cancer()
    for table, column in (("top_k.csv", "train_index"), ("self_influence.csv", "index")):
        with (workdir / table).open() as f:
            rows = list(csv.DictReader(f))
        assert rows and all(r["label"] == names[int(train[1][int(r[column])])] for r in rows)
    browser_path = _chromium()
    if browser_path is None or importlib.util.find_spec("playwright") is None:
        warnings.warn(
            "the page's width at 800 px was not checked: no Chromium or playwright", stacklevel=1
        )
        return
    from playwright import sync_api

    measured = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 800, "height": 1200})
        for folder in (workdir, tmp_path / "i"):
            page.goto((folder / "report.html").resolve().as_uri())
            page.wait_for_load_state("load")
            cards = "[...document.querySelectorAll('.item .meta')]"
            measured.append(
                (
                    page.evaluate("document.documentElement.scrollWidth"),
                    page.evaluate(f"{cards}.length"),
                    page.evaluate(f"{cards}.filter(m => m.scrollWidth > m.clientWidth).length"),
                )
            )
        browser.close()
    (width, _, _), (image_width, cards, clipped) = measured
    assert width <= 800 and image_width <= 800 and cards > 0 and clipped == 0, measured


def test_class_names_with_a_task_of_ones_own_keep_its_float_targets_as_numbers(
    project: Path, tmp_path: Path
) -> None:
    """A custom task factory (a regression on 0/1 targets) with one class name: the page named
    float labels by index and raised IndexError (a reviewer's); a float target is named only
    with the two names of a binary classifier."""
    config = tmp_path / "custom.toml"
    config.write_text(
        _tabular_config(
            "linear",
            "cancer_regression",
            'class_names = ["malignant"]\n',
            'factory = "tester_project:regression_task"',
        )
    )
    shutil.copy(project / "tester_project.py", tmp_path / "tester_project.py")
    workdir = tmp_path / "w"
    assert cli.main(["run", str(config), "--out", str(workdir), "--quiet"]) == 0
    with (workdir / "top_k.csv").open() as f:
        labels = {r["label"] for r in csv.DictReader(f)}
    assert labels and labels <= {"0.0", "1.0", "0", "1"}, labels


def test_a_model_factory_returning_a_data_parallel_wrapper_runs(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reviewer's [model] factory returning nn.DataParallel(model): with a [task] factory the
    run was refused as "a Task around a model that is not the one [model] factory built" (the
    task reads through the wrapper), with [task] kind a raw AttributeError. Both run, with the
    bare model's top proponents."""
    source = (project / "tester_project.py").read_text()
    (tmp_path / "tester_project.py").write_text(
        source + "\n\ndef wrapped():\n    return torch.nn.DataParallel(model())\n\n\n"
        "def task_of(net):\n    return infkit.Task.classification(net)\n"
    )
    plain = CONFIG.format(n_loo=0)
    wrapped = plain.replace('"tester_project:model"', '"tester_project:wrapped"')
    with_task = wrapped.replace(
        "[report]", '[task]\nfactory = "tester_project:task_of"\n\n[report]'
    )
    tables = {}
    for name, body in (("plain", plain), ("kind", wrapped), ("factory", with_task)):
        (tmp_path / f"{name}.toml").write_text(body)
        out = tmp_path / name
        code = cli.main(["run", str(tmp_path / f"{name}.toml"), "--out", str(out), "--quiet"])
        assert code == 0, capsys.readouterr().err
        tables[name] = (out / "top_k.csv").read_text()
    assert tables["kind"] == tables["plain"] == tables["factory"]


def test_retrainings_that_moved_far_along_the_step_are_read_as_the_estimates_error() -> None:
    """A tester's convex softmax regression: two high-leverage removals moved 3.2x and 3.4x
    the estimator's step at cosines 0.96 and 0.99, and the warning spoke of another optimum of
    a non-convex objective. Along the step the reading is first order's own error; off it, the
    retrained models may be elsewhere."""
    from infkit.report.views import far_reading

    along = [
        {"index": 365, "moved": 3.23, "cosine": 0.96},
        {"index": 89, "moved": 3.38, "cosine": 0.99},
    ]
    plain = {"estimator": "if", "damping": 0.0}
    assert "lie along the estimator's step" in far_reading(along, plain)
    assert "estimator='newton'" in far_reading(along, plain)
    assert "non-convex" not in far_reading(along, plain)
    assert "damping" not in far_reading(along, plain)
    # a reviewer's: a damped Newton run was advised Newton; the damping is what shortens it
    damped = far_reading(along, {"estimator": "newton", "damping": 0.003})
    assert "the damping (0.003) shortens" in damped and "estimator='newton'" not in damped
    # and a Kronecker method's "auto" damping is a damping too (a reviewer's read as none)
    assert "the damping (auto) shortens" in far_reading(
        along, {"estimator": "if", "damping": "auto"}
    )
    astray = [*along, {"index": 7, "moved": 12.9, "cosine": 0.14}]
    assert "another optimum of a non-convex objective" in far_reading(astray, plain)
