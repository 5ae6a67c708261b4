"""`haulage run`, `watch`, `status`, `results`, `list`, `cancel`, `resume`, `workflows`: starting and following runs.

The commands call the public API as ``haulage.get_run(...)`` rather than
importing the functions by name: the package loads their modules (and the
Celery app and the store) on first use, so the app is built only when a
command runs, after ``haulage dev`` or ``demo`` has set the environment it
reads, and ``haulage --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import haulage
from haulage import UsageError
from haulage.cli.display import ProgressPrinter, record_summary, to_json

if TYPE_CHECKING:  # for annotations only, as in display.py
    from haulage import RunRecord


def parse_params(pairs: list[str], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """``-p key=value``: coerced by the parameter's type in ``schema`` (the workflow's JSON schema).

    A ``str`` parameter takes the text as given (``-p order_id=12345`` stays ``"12345"``);
    any other value is JSON when it parses as JSON (``-p pages=[1,2]``), else the text, and
    the workflow's validation has the last word.
    """
    params: dict[str, Any] = {}
    properties = (schema or {}).get("properties", {})
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-p expects key=value, got {pair!r}")
        types = _json_types(properties.get(key, {}), schema or {})
        if types and types <= {"string", "null"} and not ("null" in types and raw == "null"):
            params[key] = raw
            continue
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


def _json_types(spec: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """The JSON types a parameter's schema allows (following $ref and anyOf); empty when it says nothing."""
    if "$ref" in spec:
        spec = schema.get("$defs", {}).get(str(spec["$ref"]).rsplit("/", 1)[-1], {})
    if "anyOf" in spec:
        found: set[str] = set()
        for option in spec["anyOf"]:
            more = _json_types(option, schema)
            if not more:
                return set()
            found |= more
        return found
    kind = spec.get("type")
    if isinstance(kind, str):
        return {kind}
    if "enum" in spec and all(isinstance(v, str) for v in spec["enum"]):
        return {"string"}
    return set()


def follow(run_id: str, timeout: float | None, *, quiet: bool = False) -> Any:
    """Show a live progress line until the run ends (driven by the store's change feed); return its final record."""
    printer = None if quiet else ProgressPrinter()
    record = None
    try:
        for record in haulage.get_run(run_id).watch(timeout=timeout):
            if printer:
                printer.show(record)
    finally:
        if printer:
            printer.done()
    return record


def print_outcome(record: RunRecord, as_json: bool) -> int:
    """Print a finished run (its results when it completed); the exit code says whether it completed."""
    results: Any = None
    if record.status is haulage.RunStatus.COMPLETE:
        results = haulage.get_run(record.id).results()
    if as_json:
        print(to_json({"run": record.to_dict(), "results": results}))
    else:
        print(record_summary(record, haulage.get_run(record.id).steps()))
        if results is not None:
            print("results")
            print(to_json(results))
    return 0 if record.status is haulage.RunStatus.COMPLETE else 1


def cmd_run(args: argparse.Namespace) -> int:
    haulage.registry.load_modules()
    wf = haulage.registry.get(args.name)
    run = wf.start(
        created_by=args.created_by,
        idempotency_key=args.idempotency_key,
        tags=args.tag or None,
        **parse_params(args.param or [], wf.parameters_schema()),
    )
    if not (args.wait or args.watch):
        print(json.dumps({"run_id": run.id}) if args.json else run.id)
        return 0
    if not args.json:
        print(f"run {run.id}")
    record = follow(run.id, args.timeout, quiet=args.json or not args.watch)
    return print_outcome(record, args.json)


def cmd_watch(args: argparse.Namespace) -> int:
    record = follow(args.run_id, args.timeout)
    return print_outcome(record, False)


def cmd_status(args: argparse.Namespace) -> int:
    record = haulage.get_run(args.run_id).status()
    print(to_json(record.to_dict()) if args.json else record_summary(record))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """The results as JSON on stdout; the failed items (with their parameters) on stderr, or as JSON with --failures.

    After a stage that reduced a fan-out the results no longer say which items
    failed; the run document still lists them, so they are always printed.
    """
    run = haulage.get_run(args.run_id)
    if args.failures:
        print(to_json([f.to_dict() for f in run.failures()]))
        return 0
    print(to_json(run.results()))
    failures = run.failures()
    if failures:
        print(f"{len(failures)} item(s) failed (--failures prints them as JSON):", file=sys.stderr)
        for f in failures:
            print(f"  {f.step}  {f.label or to_json(f.params)}: {f.error_type}: {f.message}", file=sys.stderr)
    return 0


#: what people call a status Haulage names otherwise
STATUS_SYNONYMS = {"RUNNING": "PROCESSING", "STARTED": "PROCESSING", "ACTIVE": "PROCESSING", "QUEUED": "PENDING",
                   "SUCCESS": "COMPLETE", "SUCCEEDED": "COMPLETE", "DONE": "COMPLETE", "COMPLETED": "COMPLETE",
                   "FAILURE": "FAILED", "ERROR": "FAILED", "CANCELED": "CANCELLED", "REVOKED": "CANCELLED"}  # fmt: skip


def parse_status(value: str | None) -> str | None:
    """A run status by name, any case; a name Haulage does not use is refused with the one it means."""
    if value is None:
        return None
    name = value.strip().upper()
    known = [s.value for s in haulage.RunStatus]
    if name in known:
        return name
    hint = f"did you mean {STATUS_SYNONYMS[name]}? " if name in STATUS_SYNONYMS else ""
    raise UsageError(f"unknown run status {value!r}; {hint}statuses are {', '.join(known)}")


def cmd_list(args: argparse.Namespace) -> int:
    status = parse_status(args.status)
    runs = haulage.list_runs(workflow=args.workflow, status=status, created_by=args.created_by,
                             limit=args.limit, offset=args.offset)  # fmt: skip
    if args.json:
        print(to_json([r.to_dict() for r in runs]))
        return 0
    for r in runs:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
        print(f"{r.id}  {stamp}  {r.workflow:<18} {r.status.value:<10} {r.percent:5.1f}%  {r.message[:50]}")
    if not runs:
        print("no runs")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    cancelled = haulage.cancel_run(args.run_id)
    print(f"run {args.run_id} cancelled" if cancelled else f"run {args.run_id} had already ended; nothing to cancel")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    haulage.registry.load_modules()
    before = haulage.get_run(args.run_id).status().status
    if before is haulage.RunStatus.COMPLETE:
        print(f"run {args.run_id} is already complete; nothing to resume (`haulage results {args.run_id}`)")
        return 0
    run = haulage.get_run(args.run_id).resume()
    print(f"run {run.id} resumed ({run.status().status.value})")
    return 0


def cmd_workflows(args: argparse.Namespace) -> int:
    haulage.registry.load_modules()
    listing: list[dict[str, Any]] = []
    for wf in haulage.registry.all_workflows():
        schema = wf.parameters_schema()
        required = set(schema.get("required", []))
        params = {name: {"type": _type_of(spec), "required": name in required,
                         **({"default": spec["default"]} if "default" in spec else {})}
                  for name, spec in schema.get("properties", {}).items()}  # fmt: skip
        listing.append({"name": wf.name, "on_failure": wf.on_failure, "parameters": params,
                        "description": (wf.__doc__ or "").strip().splitlines()[0] if wf.__doc__ else ""})  # fmt: skip
    if args.json:
        print(to_json(listing))
        return 0
    if not listing:
        print("no workflows registered; set HAULAGE_MODULES to your modules")
    for item in listing:
        shown = ", ".join(f"{n}: {p['type']}{_default_shown(p)}" for n, p in item["parameters"].items())
        print(f"{item['name']}({shown})  {item['description']}")
    return 0


def _default_shown(param: dict[str, Any]) -> str:
    if param["required"]:
        return ""
    if "default" in param:
        return f" = {json.dumps(param['default'])}"
    return " (optional)"


def _type_of(spec: dict[str, Any]) -> str:
    if "type" in spec:
        if spec["type"] == "array" and isinstance(spec.get("items"), dict):
            return f"list[{_type_of(spec['items'])}]"
        return str(spec["type"])
    if "$ref" in spec:
        return str(spec["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in spec:
        return " | ".join(_type_of(s) for s in spec["anyOf"])
    return "any"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the run commands on the ``haulage`` parser."""
    p = sub.add_parser("run", help="start a workflow by name")
    p.add_argument("name")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="a parameter, coerced by its type (str stays text; other values parse as JSON)")
    p.add_argument("--created-by")
    p.add_argument("--idempotency-key")
    p.add_argument("--tag", action="append")
    p.add_argument("--wait", action="store_true", help="wait for the run to end and print the outcome")
    p.add_argument("--watch", action="store_true", help="like --wait, with a live progress bar")
    p.add_argument("--timeout", type=float)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("watch", help="follow a run with a live progress bar until it ends")
    p.add_argument("run_id")
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_watch)

    for name, func, help_text in (
        ("status", cmd_status, "show a run's document"),
        ("results", cmd_results, "print a finished run's results as JSON"),
        ("cancel", cmd_cancel, "cancel a run"),
        ("resume", cmd_resume, "resume a run from its checkpoints"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run_id")
        if name == "status":
            p.add_argument("--json", action="store_true")
        if name == "results":
            p.add_argument("--json", action="store_true", help="(results are always JSON)")
            p.add_argument("--failures", action="store_true",
                           help="print the failed items (step, label, params, error) as JSON instead")  # fmt: skip
        p.set_defaults(func=func)

    p = sub.add_parser("list", help="list runs, newest first")
    p.add_argument("--workflow")
    p.add_argument("--status", help="PENDING, PROCESSING, COMPLETE, FAILED or CANCELLED")
    p.add_argument("--created-by")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("workflows", help="list registered workflows and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workflows)
