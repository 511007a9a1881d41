"""The `evolforge` command line: ingest seeds, run the factory, query the catalog, manage datasets.

    evolforge ingest gsm8k math                      # GSM8K + MATH train from ../shared/data
    evolforge ingest file --path my.jsonl --map question=q,answer=a
    evolforge ingest hf --name openai/gsm8k --config main --format gsm8k
    evolforge run --config configs/demo.yaml --set evolution.rounds=2
    evolforge run --flow data --config configs/demo.yaml
    evolforge sql "SELECT source, count(*) FROM seeds GROUP BY ALL"
    evolforge sql --shell                            # a read-only SQL prompt (or stdin)
    evolforge datasets ls | show seeds | export seeds --to out.jsonl
    evolforge models push sft_model --repo-id me/wizardmath-sft   # a checkpoint to the hub
    evolforge cluster up --workers 1 | status | down   # a local Ray cluster + Prefect server

Every command fails with one line on stderr and a non-zero exit; set EVOLFORGE_DEBUG=1 for the
traceback. Heavy libraries are imported only by the commands that need them, so `sql` and
`datasets` start fast.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from storage.errors import UserError

EXIT_ERROR = 2
EPHEMERAL_STARTUP_TIMEOUT_S = 180


class CliError(UserError):
    """A user-facing error: printed as one line."""


class _FlowNames:
    """The names of `flows.registry.FLOWS`, read only when `run --flow` is parsed or its help
    printed, so that `sql` and `datasets` start without importing Prefect and the flows."""

    def _names(self) -> list[str]:
        from flows.registry import FLOWS

        return list(FLOWS)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _prepare_env() -> None:
    """Keep Prefect's local state and results inside EVOLFORGE_HOME unless the user chose otherwise."""
    from storage.settings import home

    data_home = home()
    # Run profiles may name `${EVOLFORGE_HOME}` (the nightly profile's inbox of seed files).
    os.environ.setdefault("EVOLFORGE_HOME", str(data_home))
    os.environ.setdefault("PREFECT_HOME", str(data_home / "prefect"))
    os.environ.setdefault(
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(data_home / "prefect" / "results")
    )
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(data_home / "prefect" / "results"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # No telemetry from the ephemeral server: there is no network to send it to.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API server creates and migrates its SQLite database on a fresh data home's
    # first run: about 26 s on a busy 2-core machine, past Prefect's default wait of 20 s.
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S)
    )


# -- formatting --------------------------------------------------------------------------------


def _cell(value: Any, width: int = 60) -> str:
    if value is None:
        return "NULL"
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, default=str)
        if isinstance(value, list | dict)
        else str(value)
    )
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60) -> str:
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [
        line,
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        line,
    ]
    out += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    out.append(line)
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    if fmt == "table":
        print(format_table(columns, rows))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(
            [
                [json.dumps(v, default=str) if isinstance(v, list | dict) else v for v in r]
                for r in rows
            ]
        )
    else:
        for row in rows:
            print(json.dumps(dict(zip(columns, row, strict=True)), default=str, ensure_ascii=False))


# -- commands ----------------------------------------------------------------------------------


def _parse_mapping(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise CliError(f"--map expects field=column pairs separated by commas, got {item!r}")
        mapping[key.strip()] = value.strip()
    return mapping


def cmd_ingest(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tasks.seeds import IngestParams, SeedSource, ingest_seeds

    if len(args.source) > 1 and (args.path or args.name):
        raise CliError(
            "--path/--name apply to one source; ingest several files with one command each and --add"
        )
    try:
        options = {field: getattr(args, field) for field in INGEST_OPTIONS.values()}
        sources = [
            SeedSource(kind=kind, mapping=_parse_mapping(args.map), **options)
            for kind in args.source
        ]
        previous = _previous_seeds()
        if args.add and previous is not None:
            known = [s.fingerprint() for s in previous[1]]
            sources = previous[1] + [s for s in sources if s.fingerprint() not in known]
        params = IngestParams(sources=sources, strict=args.strict, max_row_chars=args.max_row_chars)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError(f"invalid ingest options: {first['msg']}") from exc
    result = ingest_seeds.run(params=params)
    stats = result.stats
    seeds, rejected = result["seeds"], result["seeds_rejected"]
    state = "already ingested (no new version)" if result.cached else "ingested"
    print(f"{state}: {seeds}  rejected: {rejected}")
    if not args.add and previous is not None and previous[0].version != seeds.version:
        old = previous[0]
        names = ", ".join(_describe(s) for s in previous[1]) or "unknown sources"
        print(
            f"replaced the previous seeds {old.name}@{old.version} ({names}; {old.rows} rows), "
            f"which stay on disk as that version; to add to them instead: "
            f"evolforge ingest {' '.join(args.source)} --add"
        )
    print(
        f"read {stats['read']} = accepted {stats['accepted']} + rejected {stats['rejected']}"
        f" (of which {stats['duplicate_questions_collapsed']} duplicate questions collapsed)"
    )
    for reason, count in sorted(stats.get("rejected_by_reason", {}).items()):
        print(f"  rejected {reason}: {count}")
    if stats["rejected"]:
        print(
            'see them with: evolforge sql "SELECT file, line, reason, detail FROM seeds_rejected"'
        )
    return 0


def _previous_seeds():
    """(manifest, sources) of the newest seeds version, or None when there are no seeds yet."""
    from storage.datasets import DatasetStore
    from storage.settings import home
    from tasks.seeds import SeedSource

    store = DatasetStore(home())
    if not store.versions("seeds"):
        return None
    manifest = store.latest("seeds")
    # Where the sources were read from is in the stats (the version names them by content);
    # a version written before that kept each path in its parameters.
    located = manifest.stats.get("sources")
    if located is None:
        located = manifest.params.get("params", {}).get("sources", [])
    fields = set(SeedSource.model_fields)
    sources = [SeedSource(**{k: v for k, v in data.items() if k in fields}) for data in located]
    return manifest, sources


def _describe(source) -> str:
    label = source.source_label()
    return f"{label} {source.path}" if source.kind == "file" and source.path else label


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from storage.catalog import Catalog
    from storage.settings import home

    if args.shell == (args.query is not None):
        raise CliError("sql needs a QUERY or --shell (not both)")
    if args.shell:
        return _sql_shell(Catalog(home()), args.format)
    try:
        columns, rows = Catalog(home()).query(args.query)
    except duckdb.Error as exc:
        raise CliError(f"sql: {str(exc).splitlines()[0]}") from exc
    print_rows(columns, rows, args.format)
    return 0


SHELL_HELP = """Statements end with ';' and may span lines. Each opens the catalog read-only on
its own, so a running flow can update it in between. .tables lists the tables and views,
.quit (or end of input) leaves."""


def _shell_line(interactive: bool, prompt: str) -> str | None:
    """The next line typed at the prompt, or read from stdin when it is not a terminal; None at
    the end of input."""
    if not interactive:
        return sys.stdin.readline() or None
    try:
        return input(prompt)
    except EOFError:
        print()
        return None


def _sql_shell(catalog: Any, fmt: str) -> int:
    """A read-only SQL prompt on the catalog: the DuckDB of this environment, which reads the
    catalog file the project wrote (a DuckDB CLI of another version may not)."""
    import duckdb

    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"evolforge sql shell on {catalog.path} (read-only).\n{SHELL_HELP}")
    failed = False
    buffer: list[str] = []
    while True:
        try:
            line = _shell_line(interactive, "     ...> " if buffer else "evolforge> ")
        except KeyboardInterrupt:  # at the prompt: drop the statement being typed
            if not interactive:
                raise
            print()
            buffer = []
            continue
        if line is None:
            break
        command = line.strip()
        if not buffer and command in (".quit", ".exit"):
            break
        if not buffer and command == ".help":
            print(SHELL_HELP)
            continue
        if not buffer and command == ".tables":
            failed |= not _shell_run(catalog, "SHOW TABLES", fmt)
            continue
        if command:
            buffer.append(line.rstrip("\n"))
        if not command.endswith(";"):
            continue
        text, buffer = "\n".join(buffer), []
        try:
            statements = [s.query for s in duckdb.extract_statements(text)]
        except duckdb.Error as exc:
            _shell_error(exc)
            failed = True
            continue
        for statement in statements:
            failed |= not _shell_run(catalog, statement, fmt)
    if buffer:  # a last statement without ';'
        failed |= not _shell_run(catalog, "\n".join(buffer), fmt)
    return EXIT_ERROR if failed and not interactive else 0


def _shell_run(catalog: Any, statement: str, fmt: str) -> bool:
    import duckdb

    try:
        columns, rows = catalog.query(statement)
    except duckdb.Error as exc:
        _shell_error(exc)
        return False
    if columns:
        print_rows(columns, rows, fmt)
    return True


def _shell_error(exc: Exception) -> None:
    print(f"evolforge: sql: {str(exc).strip().splitlines()[0]}", file=sys.stderr)


def cmd_datasets(args: argparse.Namespace) -> int:
    from storage.datasets import DatasetStore
    from storage.settings import home

    store = DatasetStore(home())
    if args.action == "ls":
        rows = []
        for name in store.names():
            versions = store.versions(name)
            if versions:
                newest = versions[-1]
                rows.append(
                    (
                        name,
                        newest.version,
                        newest.rows,
                        len(versions),
                        newest.stage,
                        newest.created_at[:19],
                    )
                )
        print_rows(["name", "newest", "rows", "versions", "stage", "created_at"], rows, args.format)
        return 0
    if not args.spec:
        raise CliError(f"datasets {args.action} needs NAME or NAME@VERSION")
    manifest = store.resolve(args.spec)
    if args.action == "show":
        versions = [m.version for m in store.versions(manifest.name)]
        print(
            f"{manifest.name}@{manifest.version}  stage={manifest.stage}  code={manifest.code_version}"
        )
        print(
            f"rows: {manifest.rows}   created: {manifest.created_at}   flow run: {manifest.flow_run or '-'}"
        )
        print(f"path: {store.location(manifest.name, manifest.version)}")
        print(f"parents: {', '.join(manifest.parents) or '-'}")
        print("schema: " + ", ".join(f"{c['name']}:{c['type']}" for c in manifest.schema))
        print("params: " + json.dumps(manifest.params, default=str)[:2000])
        if manifest.stats:
            print("stats: " + json.dumps(manifest.stats, default=str)[:2000])
        print(f"versions ({len(versions)}): " + ", ".join(versions))
        return 0
    return _export(store, manifest, args)


def _export(store, manifest, args: argparse.Namespace) -> int:
    description = f"evolforge {manifest.name}@{manifest.version} (stage {manifest.stage})"
    if args.push_to_hub:
        if (args.export_format or "hf") != "hf":
            raise CliError("--push-to-hub needs --as hf")
        from tasks.export import push_to_hub

        url = push_to_hub(
            store.read(manifest.ref),
            args.push_to_hub,
            private=args.private,
            description=description,
        )
        print(f"pushed {manifest.rows} rows of {manifest.name}@{manifest.version} to {url}")
        if not args.to:
            return 0
    if not args.to:
        raise CliError("datasets export needs --to PATH (or --push-to-hub REPO)")
    target = Path(args.to).expanduser()
    fmt = args.export_format or {".jsonl": "jsonl", ".parquet": "parquet"}.get(target.suffix, "")
    if fmt not in ("jsonl", "parquet", "hf"):
        raise CliError("choose --as jsonl|parquet|hf (or give --to a .jsonl/.parquet name)")
    frame = store.read(manifest.ref)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        frame.write_ndjson(target)
    elif fmt == "parquet":
        frame.write_parquet(target)
    else:
        from tasks.export import hf_dataset

        # a `split` column (the training sets' train/test) becomes the data set's splits
        hf_dataset(frame, description).save_to_disk(str(target))
    print(
        f"exported {manifest.rows} rows of {manifest.name}@{manifest.version} to {target} ({fmt})"
    )
    return 0


def model_lineage(store: Any, manifest: Any) -> tuple[str, str]:
    """A checkpoint's hub commit: (message naming the evolforge version, the checkpoint and its
    parents; a description with the stage, code version, base model and training sets)."""
    from tasks.evaluation.models import training_sets
    from tasks.export import evolforge_version

    ref = f"{manifest.name}@{manifest.version}"
    parents = ", ".join(manifest.parents) or "no parents"
    message = f"evolforge {evolforge_version()}: {ref} from {parents}"
    found, _ = training_sets(store, ref)
    lines = [
        f"checkpoint: {ref} (stage {manifest.stage}, code version {manifest.code_version})",
        f"parents: {parents}",
        f"training sets: {', '.join(found) or '-'}",
        f"base model: {manifest.stats.get('base_model', '-')}",
        f"load: {manifest.stats.get('load', '-')}",
        f"created: {manifest.created_at}",
    ]
    return message, "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    from storage.datasets import DatasetStore
    from storage.settings import home
    from tasks.export import push_model

    store = DatasetStore(home())
    try:
        manifest = store.resolve(args.spec)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"models push: {args.spec!r}: {first}") from exc
    if manifest.kind != "model":
        raise CliError(
            f"models push: {manifest.name}@{manifest.version} is a {manifest.kind}, "
            "not a model checkpoint"
        )
    message, description = model_lineage(store, manifest)
    url = push_model(
        store.version_dir(manifest.name, manifest.version),
        args.repo_id,
        commit_message=message,
        commit_description=description,
        private=args.private,
        revision=args.revision,
    )
    print(f"pushed {manifest.name}@{manifest.version} to {args.repo_id}: {url}")
    return 0


def _say_engines(params: object) -> None:
    """The engines a run uses, and why `auto` chose them, on stderr before it starts."""
    from infra.engines import describe_engines

    for line in describe_engines(params):
        print(f"evolforge: {line}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from flows.registry import FLOWS, load_run

    arguments = load_run(args.config, args.set or [], args.flow)
    _say_engines(list(arguments.values()))
    entry = FLOWS[args.flow]
    print(entry.summary(entry.flow(**arguments)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from flows.evaluation import eval_params_from_cli
    from flows.registry import FLOWS

    def split(text: str | None) -> list[str]:
        return [part.strip() for part in (text or "").split(",") if part.strip()]

    params = eval_params_from_cli(
        [model for spec in args.models for model in split(spec)],
        split(args.benchmarks),
        split(args.modes),
        args.limit,
        seed=args.seed,
        k=args.k,
        prompt_format=args.prompt_format,
        config=args.config,
        overrides=args.set or [],
    )
    _say_engines(params)
    entry = FLOWS["evaluation"]
    print(entry.summary(entry.flow(params=params)))
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from flows import cluster

    state_dir = Path(args.state_dir).expanduser() if args.state_dir else None
    if args.action == "up":
        state = cluster.up(
            state_dir,
            workers=args.workers,
            cpus=args.cpus,
            object_store_mb=args.object_store_mb,
            prefect=not args.no_prefect,
            s3=args.s3,
        )
        if not args.quiet:
            for proc in state.procs:
                where = f" {proc.url}" if proc.url else ""
                print(f"# {proc.role}: pid {proc.pid}{where}, log {proc.log}", file=sys.stderr)
            print(
                "# run on it: evolforge run --config configs/demo.yaml --set executor.kind=ray "
                "--set executor.address=$RAY_ADDRESS",
                file=sys.stderr,
            )
        print(cluster.exports_text(state))
        return 0
    state = cluster.ClusterState.load(state_dir or cluster.default_state_dir())
    if args.action == "down":
        stopped = cluster.down(state)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    report = cluster.status(state)
    for proc in report["procs"]:
        where = f" {proc['url']}" if proc["url"] else ""
        print(f"{proc['role']}: pid {proc['pid']} {'up' if proc['alive'] else 'DOWN'}{where}")
    for key in ("listening_on_all_interfaces", "listening_on_host_address"):
        if report[key]:
            print(f"{key.replace('_', ' ')}: {', '.join(report[key])}")
    beyond = report["connected_beyond_loopback"]
    print("connections beyond loopback: " + (", ".join(beyond) if beyond else "none"))
    print(cluster.exports_text(state))
    return 0 if all(p["alive"] for p in report["procs"]) else EXIT_ERROR


def cmd_catalog(args: argparse.Namespace) -> int:
    from storage.catalog import Catalog
    from storage.settings import home, home_url

    catalog = Catalog(home())
    count = catalog.rebuild()
    print(f"catalog rebuilt from {count} manifest(s) in {home_url()}: {catalog.path}")
    return 0


# `evolforge ingest` options that set a field of each `SeedSource` (option → field): their
# choices, defaults and help are the model's.
INGEST_OPTIONS = {
    "--path": "path",
    "--name": "name",
    "--config": "config",
    "--split": "split",
    "--format": "format",
    "--label": "label",
    "--limit": "limit",
}


def _option_from_field(parser: argparse.ArgumentParser, flag: str, info: Any, **extra) -> None:
    """An option whose type, choices, default and help come from a pydantic field."""
    annotation = info.annotation
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = options[0] if len(options) == 1 else None
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    default = info.get_default(call_default_factory=True)
    help_text = (info.description or "").replace("%", "%%")
    if default is not None:
        help_text += " (default: %(default)s)"
    parser.add_argument(
        flag,
        type=kind if kind in (int, float) else None,
        choices=choices,
        default=default,
        help=help_text,
        **extra,
    )


def _add_ingest(sub: Any) -> None:
    # pydantic and the seed models only; nothing heavy, so `sql` and `datasets` still start fast.
    from tasks.seeds import IngestParams, SeedSource

    ingest = sub.add_parser("ingest", help="load seed problems into the seeds dataset")
    kind = SeedSource.model_fields["kind"]
    ingest.add_argument(
        "source", nargs="+", choices=typing.get_args(kind.annotation), help=kind.description
    )
    for flag, field in INGEST_OPTIONS.items():
        _option_from_field(ingest, flag, SeedSource.model_fields[field], dest=field)
    ingest.add_argument("--map", help="field mapping, e.g. question=q,answer=a,solution=s,id=uid")
    ingest.add_argument(
        "--strict",
        action="store_true",
        help=IngestParams.model_fields["strict"].description,
    )
    ingest.add_argument(
        "--add", action="store_true", help="add to the current seeds instead of replacing them"
    )
    _option_from_field(ingest, "--max-row-chars", IngestParams.model_fields["max_row_chars"])
    ingest.set_defaults(func=cmd_ingest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolforge", description="A data factory for math instruction data."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    _add_ingest(sub)

    run = sub.add_parser("run", help="run the factory flow (or one of its flows)")
    run.add_argument(
        "--flow",
        default="factory",
        choices=_FlowNames(),
        metavar="NAME",
        help="which flow: the whole factory (default) or one part of it: %(choices)s",
    )
    run.add_argument("--config", help="run profile (YAML), e.g. configs/demo.yaml")
    run.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a parameter (dotted keys)"
    )
    run.set_defaults(func=cmd_run)

    sql = sub.add_parser("sql", help="query the catalog (read-only)")
    sql.add_argument("query", nargs="?", help="one statement; or --shell")
    sql.add_argument(
        "--shell",
        action="store_true",
        help="a read-only SQL prompt (statements from stdin when it is not a terminal)",
    )
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.set_defaults(func=cmd_sql)

    ds = sub.add_parser("datasets", help="list, show and export dataset versions")
    ds.add_argument("action", choices=["ls", "show", "export"])
    ds.add_argument("spec", nargs="?", help="NAME or NAME@VERSION")
    ds.add_argument("--to", help="export target path")
    ds.add_argument("--as", dest="export_format", choices=["jsonl", "parquet", "hf"])
    ds.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="with --as hf: push to the Hugging Face hub (train/test splits when there are)",
    )
    ds.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    ds.add_argument("--format", choices=["table", "csv", "json"], default="table")
    ds.set_defaults(func=cmd_datasets)

    ev = sub.add_parser("eval", help="evaluate models on math benchmarks")
    ev.add_argument(
        "--model",
        action="append",
        dest="models",
        default=[],
        metavar="SPEC",
        help="base | HF folder | sft_model[@version] | label=spec (repeat it, or a,b)",
    )
    ev.add_argument(
        "--benchmarks", default="", help="gsm8k,math500,svamp,asdiv,mawps,sat_math,mmlu_stem"
    )
    ev.add_argument("--modes", default="", help="cot,pot,hybrid,maj@k")
    ev.add_argument("--limit", type=int, help="a seeded subset of N items per benchmark")
    ev.add_argument("--seed", type=int)
    ev.add_argument("--k", type=int, help="samples of maj@k")
    ev.add_argument("--prompt-format", choices=["auto", "alpaca", "chat"])
    ev.add_argument("--config", help="run profile; its `evaluation:` section is the base")
    ev.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override an evaluation parameter"
    )
    ev.set_defaults(func=cmd_eval)

    models = sub.add_parser("models", help="model checkpoints: push one to the Hugging Face hub")
    models.add_argument("action", choices=["push"])
    models.add_argument("spec", help="a checkpoint: NAME (its newest version) or NAME@VERSION")
    models.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="the hub model")
    models.add_argument("--private", action="store_true", help="create the repo private")
    models.add_argument("--revision", help="a branch to push to (created if missing)")
    models.set_defaults(func=cmd_models)
    cl = sub.add_parser(
        "cluster",
        help="a local Ray cluster (head + worker nodes), a Prefect server, an S3 server",
    )
    cl.add_argument("action", choices=["up", "down", "status"])
    cl.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    cl.add_argument("--cpus", type=int, default=1, help="CPUs each node offers to Ray")
    cl.add_argument(
        "--object-store-mb", type=int, default=100, help="each node's object store (MB, >= 75)"
    )
    cl.add_argument("--s3", action="store_true", help="also a moto S3 server with a bucket")
    cl.add_argument("--no-prefect", action="store_true", help="no Prefect server (use yours)")
    cl.add_argument("--quiet", action="store_true", help="up: print the exports only")
    cl.add_argument(
        "--state-dir", help="where the state file and logs go (default ~/.evolforge/cluster)"
    )
    cl.set_defaults(func=cmd_cluster)

    catalog = sub.add_parser("catalog", help="rebuild the DuckDB catalog from the manifests")
    catalog.add_argument("action", choices=["rebuild"])
    catalog.set_defaults(func=cmd_catalog)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _prepare_env()  # checks the data home first: a bad S3 setting is one line, nothing runs
        return args.func(args)
    except KeyboardInterrupt:
        print("evolforge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("EVOLFORGE_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, UserError) else f"{type(exc).__name__}: "
        print(f"evolforge: error: {kind}{message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
