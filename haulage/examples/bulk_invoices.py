"""Example: a bulk batch over parameter objects, some of which fail.

Each invoice is priced in EUR with VAT; invoices in an unknown currency or
with a negative amount fail (without retries: retrying cannot fix them), and
the summary shows the partitioned results.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from pydantic import BaseModel, Field

from haulage import Results, StepContext, chain, fan_out, step, workflow

#: EUR per unit of each currency (illustrative fixed rates)
RATES = {"EUR": Decimal("1"), "USD": Decimal("0.92"), "GBP": Decimal("1.17"), "CHF": Decimal("1.04")}
VAT = {"DE": Decimal("0.19"), "FR": Decimal("0.20"), "NL": Decimal("0.21"), "IE": Decimal("0.23")}


class InvoiceError(ValueError):
    """An invoice that can never be priced as given."""


class Invoice(BaseModel):
    invoice_id: str = Field(min_length=1)
    amount: str  #: a decimal string, to keep cents exact
    currency: str
    country: str


@step(retries=2, no_retry_on=(InvoiceError,))
def price_invoice(ctx: StepContext, invoice_id: str, amount: str, currency: str, country: str) -> dict[str, Any]:
    net = Decimal(amount)
    if net < 0:
        raise InvoiceError(f"invoice {invoice_id}: amount must not be negative, got {amount}")
    if currency not in RATES:
        raise InvoiceError(f"invoice {invoice_id}: unknown currency {currency!r}; known: {', '.join(RATES)}")
    if country not in VAT:
        raise InvoiceError(f"invoice {invoice_id}: no VAT rate for country {country!r}")
    cents = Decimal("0.01")
    net_eur = (net * RATES[currency]).quantize(cents, ROUND_HALF_EVEN)
    vat = (net_eur * VAT[country]).quantize(cents, ROUND_HALF_EVEN)
    return {"invoice_id": invoice_id, "net_eur": str(net_eur), "vat_eur": str(vat), "gross_eur": str(net_eur + vat)}


@step
def summarise(ctx: StepContext, results: Results) -> dict[str, Any]:
    gross = sum((Decimal(r["gross_eur"]) for r in results.successes), Decimal("0"))
    return {
        "priced": len(results.successes),
        "failed": len(results.failures),
        "gross_eur": str(gross),
        "failures": [{"invoice_id": f.params.get("invoice_id"), "error": f.message} for f in results.failures],
    }


@workflow("bulk_invoices")
def bulk_invoices(invoices: list[Invoice]) -> Any:
    """Price every invoice in parallel; bad ones are reported, the rest are priced."""
    return chain(fan_out(price_invoice, [i.model_dump() for i in invoices], label="invoice {invoice_id}"),
                 summarise.s())  # fmt: skip


SAMPLE_BATCH = [
    {"invoice_id": "INV-1", "amount": "120.00", "currency": "EUR", "country": "DE"},
    {"invoice_id": "INV-2", "amount": "99.99", "currency": "USD", "country": "FR"},
    {"invoice_id": "INV-3", "amount": "10.00", "currency": "XYZ", "country": "DE"},
    {"invoice_id": "INV-4", "amount": "250.00", "currency": "GBP", "country": "NL"},
    {"invoice_id": "INV-5", "amount": "-5.00", "currency": "EUR", "country": "IE"},
    {"invoice_id": "INV-6", "amount": "42.42", "currency": "CHF", "country": "IE"},
]
