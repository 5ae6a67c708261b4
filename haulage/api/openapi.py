"""The OpenAPI document, completed with what only the running service knows.

FastAPI documents ``POST /v1/workflows/{name}/runs`` with ``params`` as any
object. The service knows its workflows, so the document also gets one
concrete path per exposed workflow whose ``params`` is that workflow's own
JSON Schema: clients (and the fuzzer) see exactly what each one takes.
"""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from haulage.api.deps import ApiContext
from haulage.workflows import Workflow

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_BODIES = {"runs": "StartRun", "batches": "StartBatch"}


def build_openapi(app: FastAPI, ctx: ApiContext) -> dict[str, Any]:
    """FastAPI's document plus workflow names, per-workflow parameter schemas and the batch cap."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["StartBatch"]["properties"]["items"]["maxItems"] = ctx.settings.max_batch
    paths = doc["paths"]
    for kind in _BODIES:
        template = paths[f"/v1/workflows/{{name}}/{kind}"]["post"]
        for param in template.get("parameters", []):
            if param.get("name") == "name" and param.get("in") == "path":
                param["schema"]["enum"] = sorted(ctx.workflows)
    for wf in ctx.workflows.values():
        params_ref = _add_params_schema(schemas, wf)
        for kind, body in _BODIES.items():
            op = _concrete_operation(paths[f"/v1/workflows/{{name}}/{kind}"]["post"], wf.name, kind)
            name = f"{_component(wf.name)}.{body}"
            schemas[name] = _body_schema(schemas[body], params_ref, kind)
            op["requestBody"]["content"]["application/json"]["schema"] = {"$ref": f"#/components/schemas/{name}"}
            paths[f"/v1/workflows/{quote(wf.name, safe='')}/{kind}"] = {"post": op}
    app.openapi_schema = doc
    return doc


def _component(name: str) -> str:
    return _UNSAFE.sub("_", name)


def _add_params_schema(schemas: dict[str, Any], wf: Workflow) -> dict[str, Any]:
    prefix = _component(wf.name)
    schema = wf.params_model.model_json_schema(ref_template=f"#/components/schemas/{prefix}.{{model}}")
    for model, sub in schema.pop("$defs", {}).items():
        schemas[f"{prefix}.{model}"] = sub
    schemas[f"{prefix}.params"] = schema
    return {"$ref": f"#/components/schemas/{prefix}.params", "required": schema.get("required", [])}


def _body_schema(generic: dict[str, Any], params: dict[str, Any], kind: str) -> dict[str, Any]:
    body = copy.deepcopy(generic)
    ref = {"$ref": params["$ref"]}
    if kind == "runs":
        body["properties"]["params"] = ref
        if params["required"]:  # without params the required ones are missing
            body["required"] = sorted({*body.get("required", []), "params"})
    else:
        body["properties"]["items"]["items"] = ref
    return body


def _concrete_operation(template: dict[str, Any], workflow: str, kind: str) -> dict[str, Any]:
    op = copy.deepcopy(template)
    op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "name"]
    if not op["parameters"]:
        del op["parameters"]
    op["operationId"] = f"{'start' if kind == 'runs' else 'start_batch'}_{_component(workflow)}"
    op["summary"] = f"{op.get('summary', '')}: {workflow}"
    op["tags"] = [workflow]
    return op
