import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ingest_sql_and_datasets(capsys, evolforge_home):
    code, out, _ = run(capsys, "ingest", "sample")
    assert code == 0 and "read 30 = accepted 30 + rejected 0" in out
    code, out, _ = run(capsys, "ingest", "sample")
    assert code == 0 and "no new version" in out
    code, out, _ = run(capsys, "sql", "SELECT count(*) AS n FROM seeds", "--format", "json")
    assert json.loads(out) == {"n": 30}
    code, out, _ = run(
        capsys, "sql", "SELECT id, level FROM seeds ORDER BY id LIMIT 2", "--format", "csv"
    )
    assert out.splitlines()[0] == "id,level" and len(out.splitlines()) == 3
    code, out, _ = run(capsys, "sql", "SELECT count(*) AS n FROM seeds")
    assert "| n " in out and "(1 row)" in out
    code, out, _ = run(capsys, "datasets", "ls")
    assert "seeds" in out and "seeds_rejected" in out
    code, out, _ = run(capsys, "datasets", "show", "seeds")
    assert "stage=ingest" in out and "rows: 30" in out


def test_export_jsonl_parquet_and_hf(capsys, evolforge_home, tmp_path):
    run(capsys, "ingest", "sample")
    assert run(capsys, "datasets", "export", "seeds", "--to", str(tmp_path / "s.jsonl"))[0] == 0
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 30
    assert run(capsys, "datasets", "export", "seeds", "--to", str(tmp_path / "s.parquet"))[0] == 0
    assert (
        run(capsys, "datasets", "export", "seeds", "--to", str(tmp_path / "hf"), "--as", "hf")[0]
        == 0
    )
    import datasets

    assert datasets.load_from_disk(str(tmp_path / "hf")).num_rows == 30


def test_ingest_add_merges_sources(capsys, evolforge_home, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "What is 9 - 4?", "answer": "#### 5"}) + "\n")
    run(capsys, "ingest", "sample")
    code, out, _ = run(capsys, "ingest", "file", "--path", str(path), "--format", "gsm8k", "--add")
    assert code == 0 and "accepted 31" in out and "replaced" not in out


def test_replacing_seeds_says_what_was_replaced_and_add_matches_one_ingest(
    capsys, evolforge_home, shared_data
):
    _, first, _ = run(capsys, "ingest", "gsm8k")
    code, out, _ = run(capsys, "ingest", "math")
    assert code == 0
    replaced = next(line for line in out.splitlines() if line.startswith("replaced"))
    gsm8k_version = first.split("seeds@")[1].split()[0]
    assert f"seeds@{gsm8k_version} (gsm8k; 7473 rows)" in replaced
    assert replaced.endswith("to add to them instead: evolforge ingest math --add")
    # gsm8k then math --add is the same version as one ingest of both
    run(capsys, "ingest", "gsm8k")
    _, added, _ = run(capsys, "ingest", "math", "--add")
    _, both, _ = run(capsys, "ingest", "gsm8k", "math")
    version = added.split("seeds@")[1].split()[0]
    assert "already ingested (no new version)" in both and f"seeds@{version}" in both
    # adding a source that is already there does not list it twice
    _, again, _ = run(capsys, "ingest", "math", "--add")
    assert f"seeds@{version}" in again and "no new version" in again


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sql", "SELECT * FROM nope"], "evolforge: error: sql: Catalog Error"),
        (["datasets", "show", "nope"], "no dataset named 'nope'"),
        (
            ["ingest", "file", "--path", "/no/such.jsonl", "--format", "gsm8k"],
            "/no/such.jsonl: no such file",
        ),
        (["ingest", "file", "--path", "x.jsonl"], "needs a format"),
        (
            ["ingest", "file", "--path", "x.jsonl", "--map", "question"],
            "--map expects field=column",
        ),
        (["run", "--config", "/no/such.yaml"], "no such config file"),
        (["run", "--set", "seeds.strict=notabool"], "seeds.strict"),
        (["run", "--set", "solutions.enabled=false"], "rewards.enabled needs solutions.enabled"),
    ],
)
def test_errors_are_one_line_and_nonzero(capsys, evolforge_home, argv, message):
    code, _, err = run(capsys, *argv)
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1


def test_console_script_strict_error(evolforge_home, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?", "answer": "#### 1"}\n{oops\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "ingest",
            "file",
            "--path",
            str(bad),
            "--format",
            "gsm8k",
            "--strict",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"evolforge: error: {bad}:2: malformed_json: Expecting property name enclosed in double quotes at column 2"
    ]


@pytest.mark.slow
def test_first_run_on_a_fresh_home_starts_prefect(tmp_path):
    """A fresh data home (no Prefect database yet) on a busy machine: the ephemeral server's
    first start must not hit Prefect's default 20 s start-up limit."""
    from flows import cli

    home = tmp_path / "fresh-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["EVOLFORGE_HOME"] = str(home)
    code = (
        "import os, sys; from flows.cli import _prepare_env; _prepare_env(); "
        "print(os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert int(out.stdout.strip()) == cli.EPHEMERAL_STARTUP_TIMEOUT_S >= 120
    run = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--flow", "data",
         "--set", "evolution.rounds=0", "--set", "sft.enabled=false",
         "--set", "solutions.enabled=false"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (home / "prefect").is_dir() and "seeds: seeds@" in run.stdout


def test_export_push_to_hub_offline_is_one_clear_line(capsys, evolforge_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run(capsys, "ingest", "sample")
    code, _, err = run(
        capsys, "datasets", "export", "seeds", "--as", "hf", "--push-to-hub", "me/seeds"
    )
    assert code == 2 and err.count("\n") == 1
    assert "push to the hub (me/seeds)" in err and "HF_HUB_OFFLINE" in err
    code, _, err = run(
        capsys, "datasets", "export", "seeds", "--as", "jsonl", "--push-to-hub", "me/x"
    )
    assert code == 2 and "--push-to-hub needs --as hf" in err


def test_eval_follows_extends_like_run(capsys, evolforge_home, tmp_path, monkeypatch):
    """`evolforge eval --config` reads a profile as `run` does: `extends:` included."""
    from flows.registry import FLOWS, FlowEntry

    seen = []

    def evaluation(params):
        seen.append(params)

    monkeypatch.setitem(
        FLOWS, "evaluation", FlowEntry(evaluation, lambda full: full.evaluation, lambda _: "done")
    )
    (tmp_path / "base.yaml").write_text(
        "evaluation:\n  k: 4\n  modes: [cot]\n  decoding: {cot_max_tokens: 96}\n"
    )
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nevaluation:\n  limit: 3\n")
    code, out, err = run(
        capsys, "eval", "--config", str(tmp_path / "child.yaml"), "--set", "evaluation.seed=7"
    )
    assert (code, out.strip()) == (0, "done")
    # stderr has only the engine the evaluation uses, and why `auto` picked it (pinned here).
    assert err.splitlines() == [
        "evolforge: engine: embedded, model packaged SmolLM2-135M-Instruct, dtype auto "
        "(kind auto: $EVOLFORGE_AUTO_ENGINE=embedded)"
    ]
    (params,) = seen
    assert (params.limit, params.k, params.seed, params.modes) == (3, 4, 7, ["cot"])
    assert params.decoding.cot_max_tokens == 96
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    code, _, err = run(capsys, "eval", "--config", str(tmp_path / "loop.yaml"))
    assert code != 0 and "profiles extend each other in a circle" in err


def test_run_knows_the_registrys_flows(capsys, evolforge_home):
    from flows.registry import FLOWS

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert ", ".join(FLOWS) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--flow", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_ingest_options_take_their_defaults_and_choices_from_the_seed_models(monkeypatch):
    import typing

    from flows.cli import INGEST_OPTIONS, build_parser
    from tasks.seeds import IngestParams, SeedSource

    args = build_parser().parse_args(["ingest", "sample"])
    source = SeedSource()
    for field in INGEST_OPTIONS.values():
        assert getattr(args, field) == getattr(source, field), field
    assert args.max_row_chars == IngestParams().max_row_chars
    assert args.strict is IngestParams().strict
    # One source of truth: a changed model default is the command's default.
    monkeypatch.setattr(SeedSource.model_fields["split"], "default", "validation")
    monkeypatch.setattr(IngestParams.model_fields["max_row_chars"], "default", 123)
    args = build_parser().parse_args(["ingest", "sample"])
    assert (args.split, args.max_row_chars) == ("validation", 123)
    formats = typing.get_args(typing.get_args(SeedSource.model_fields["format"].annotation)[0])
    for name in formats:
        assert build_parser().parse_args(["ingest", "file", "--format", name]).format == name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "file", "--format", "alpaca"])


def test_ingest_limit_reads_only_the_first_rows(capsys, evolforge_home):
    code, out, _ = run(capsys, "ingest", "sample", "--limit", "5")
    assert code == 0 and "read 5 = accepted 5 + rejected 0" in out


def test_sql_shell_reads_statements_from_stdin(capsys, evolforge_home):
    """`evolforge sql --shell`: the catalog's views, statements over lines and several on a
    line, read-only; a failed statement is reported and the others still run."""
    run(capsys, "ingest", "sample", "--limit", "4")
    script = (
        "SELECT count(*) AS n\n  FROM seeds;\n"
        ".tables\n"
        "SELECT name FROM versions WHERE name = 'seeds'; SELECT 'a;b' AS s;\n"
        "CREATE TABLE x (a INT);\n"
        "SELECT 7 AS last\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "sql", "--shell", "--format", "json"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    views = {row["name"] for row in rows if "name" in row} - {"seeds"}
    assert rows[0] == {"n": 4} and rows[-2:] == [{"s": "a;b"}, {"last": 7}]
    assert {"seeds_rejected", "versions", "models", "artifacts"} <= views
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "read-only mode" in proc.stderr
    code, _, err = run(capsys, "sql", "SELECT 1", "--shell")
    assert code != 0 and "a QUERY or --shell" in err


@pytest.fixture
def sft_checkpoint(evolforge_home, tmp_path):
    """A real SFT checkpoint version (the tiny model, two steps)."""
    from storage.datasets import DatasetStore
    from tasks.training.common import BaseModelSpec
    from tasks.training.sft import SftTrainParams, train_sft
    from tests.tasks.training.test_sft import _sft_set
    from tests.tasks.training.tiny import make_tiny_model

    store = DatasetStore(evolforge_home)
    sft_set = _sft_set(store)
    result = train_sft.run(
        sft_set=sft_set,
        base_model=BaseModelSpec(name=str(make_tiny_model(tmp_path / "tiny"))),
        params=SftTrainParams(max_steps=1, max_length=96, eval_rows=0),
    )
    return store.manifest(result["sft_model"]), sft_set


def test_models_push_offline_no_token_and_bad_refs_are_one_line_before_any_upload(
    capsys, evolforge_home, monkeypatch, sft_checkpoint
):
    from huggingface_hub import HfApi

    capsys.readouterr()  # the fixture's training output
    calls = []
    for method in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, method, lambda self, *a, _m=method, **k: calls.append(_m))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    code, out, err = run(capsys, "models", "push", "sft_model", "--repo-id", "me/sft")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "push to the hub (me/sft)" in err and "HF_HUB_OFFLINE" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(evolforge_home / "no-hf-login"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    code, _, err = run(capsys, "models", "push", "sft_model", "--repo-id", "me/sft")
    assert code == 2 and err.count("\n") == 1 and "no Hugging Face token" in err
    code, _, err = run(capsys, "models", "push", "sft_model@nope", "--repo-id", "me/sft")
    assert code == 2 and err.count("\n") == 1
    assert "models push: 'sft_model@nope': no version of 'sft_model' matches 'nope'" in err
    code, _, err = run(capsys, "models", "push", "sft_set", "--repo-id", "me/sft")
    assert code == 2 and "sft_set@" in err and "is a dataset, not a model checkpoint" in err
    code, _, err = run(capsys, "models", "push", "sft_model", "--repo-id", "not a repo")
    assert code == 2 and "'not a repo' is not a repo id" in err
    assert calls == []


def test_models_push_uploads_the_checkpoint_folder_with_its_lineage(
    capsys, evolforge_home, monkeypatch, sft_checkpoint
):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    manifest, sft_set = sft_checkpoint
    capsys.readouterr()  # the fixture's training output
    seen: dict = {}

    def create_repo(self, repo_id, **kwargs):
        seen["repo"] = (repo_id, kwargs)

    def create_branch(self, repo_id, **kwargs):
        seen["branch"] = (repo_id, kwargs)

    def upload_folder(self, **kwargs):
        folder = kwargs["folder_path"]
        files = [str(p.relative_to(folder)) for p in sorted(Path(folder).rglob("*")) if p.is_file()]
        seen["upload"] = kwargs
        seen["files"] = list(
            filter_repo_objects(files, ignore_patterns=kwargs.get("ignore_patterns"))
        )
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"})()  # fmt: skip

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    ref = f"sft_model@{manifest.version[:8]}"
    code, out, err = run(
        capsys, "models", "push", ref, "--repo-id", "me/sft", "--private", "--revision", "v1"
    )
    assert (code, err) == (0, "")
    assert f"pushed sft_model@{manifest.version} to me/sft:" in out and "/commit/1" in out
    assert seen["repo"] == ("me/sft", {"repo_type": "model", "private": True, "exist_ok": True})
    assert seen["branch"][0] == "me/sft" and seen["branch"][1]["branch"] == "v1"
    upload = seen["upload"]
    folder = Path(upload["folder_path"])
    assert folder == evolforge_home / "datasets" / "sft_model" / manifest.version
    assert upload["repo_id"] == "me/sft" and upload["revision"] == "v1"
    files = set(seen["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_log.json"} <= files
    assert any(f.startswith("logs/events.out.tfevents.") for f in files)
    assert "_manifest.json" not in files and (folder / "_manifest.json").is_file()
    message = upload["commit_message"]
    assert message.startswith("evolforge ") and f"sft_model@{manifest.version}" in message
    assert str(sft_set) in message
    assert "stage train_sft" in upload["commit_description"]
    assert "base model: folder-sha256:" in upload["commit_description"]
