"""Example: review a building plan against the rulebook, one task per page.

extract_pages -> fan_out(analyze_page) over the pages found -> compile_report.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from haulage import Results, StepContext, chain, fan_out, step, workflow
from haulage.examples.rulebook import check_page

SAMPLE = Path(__file__).parent / "data" / "sample_plan.txt"
#: illustrative price of the rule engine, per 1,000 tokens
USD_PER_1K_TOKENS = 0.002


@step(runtime="short", retries=2)
def extract_pages(ctx: StepContext, project_id: str, document: str) -> list[dict[str, Any]]:
    """Split the document into pages (form feeds separate them); "sample" is the shipped plan."""
    text = SAMPLE.read_text(encoding="utf-8") if document == "sample" else document
    pages = [p.strip() for p in text.split("\f")]
    found = [{"page": n, "text": p} for n, p in enumerate(pages, start=1) if p]
    ctx.progress(100, f"{len(found)} page(s) found in {project_id}'s document")
    return found


@step(runtime="long", retries=3, soft_timeout=120, hard_timeout=180)
def analyze_page(ctx: StepContext, project_id: str, page: int, text: str) -> dict[str, Any]:
    """Check one page against the rulebook; report progress, cost and one metered usage record."""
    ctx.progress(10, f"page {page}: reading")
    words = len(text.split())
    findings, checked = check_page(text)
    ctx.progress(80, f"page {page}: {checked} measurement(s) checked, {len(findings)} finding(s)")
    tokens_in, tokens_out = int(words * 1.3), 40 * len(findings) + 20
    ctx.add_cost("rulebook-v1", usd=(tokens_in + tokens_out) / 1000 * USD_PER_1K_TOKENS,
                 input_tokens=tokens_in, output_tokens=tokens_out)  # fmt: skip
    with ctx.once("meter-page") as first:
        if first:  # usage is metered once per page, however often the step is retried
            ctx.event(f"metered page {page} of {project_id}", kind="usage")
    return {"page": page, "checked": checked, "findings": findings}


@step(runtime="short")
def compile_report(ctx: StepContext, results: Results, project_id: str) -> dict[str, Any]:
    """Summarise the findings of every page, and list the pages that could not be reviewed."""
    pages = sorted(results.successes, key=lambda r: r["page"])
    findings = [dict(f, page=p["page"]) for p in pages for f in p["findings"]]
    severity = Counter(f["severity"] for f in findings)
    ctx.progress(100, f"report: {len(findings)} finding(s) on {len(pages)} page(s)")
    return {
        "project_id": project_id,
        "pages_reviewed": len(pages),
        "measurements_checked": sum(p["checked"] for p in pages),
        "findings": findings,
        "by_severity": dict(sorted(severity.items())),
        "pages_failed": [f.params.get("page") for f in results.failures],
        "verdict": "revise and resubmit" if severity.get("critical") else "approve with comments",
    }


@workflow("plan_review")
def plan_review(project_id: str, document: str = "sample") -> Any:
    """Review a plan document page by page against the rulebook."""
    return chain(
        extract_pages.s(project_id=project_id, document=document),
        fan_out(analyze_page, kwargs={"project_id": project_id}),
        compile_report.s(project_id=project_id),
    )
