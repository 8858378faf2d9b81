"""XEP-0004 Data Forms: building forms and results, reading what a client submitted.

Kept in one place because registration, entity capabilities and admin commands all speak forms, and
each of them must agree on details such as the hidden FORM_TYPE field of XEP-0068.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from xml.etree.ElementTree import Element, SubElement

from server import ns

X = ns.qname(ns.DATA_FORMS, "x")
FIELD = ns.qname(ns.DATA_FORMS, "field")
VALUE = ns.qname(ns.DATA_FORMS, "value")
FORM_TYPE = "FORM_TYPE"


@dataclass(frozen=True)
class Field:
    """One field of a form, as XEP-0004 3.2 describes it."""

    var: str | None
    type: str = "text-single"
    label: str | None = None
    values: tuple[str, ...] = ()
    required: bool = False
    options: tuple[str, ...] = ()  # the choices of a list-single or list-multi field


def build_form(type: str, fields: Iterable[Field], *, form_type: str | None = None, title: str | None = None,
               instructions: str | None = None) -> Element:
    """An <x/> of `type` ('form', 'result', 'submit'...), with the FORM_TYPE field first when given."""
    x = Element(X, {"type": type})
    if title is not None:
        SubElement(x, ns.qname(ns.DATA_FORMS, "title")).text = title
    if instructions is not None:
        SubElement(x, ns.qname(ns.DATA_FORMS, "instructions")).text = instructions
    if form_type is not None:
        fields = [Field(FORM_TYPE, "hidden", values=(form_type,)), *fields]
    for field in fields:
        x.append(_field(field))
    return x


def _field(field: Field) -> Element:
    attrs = {"type": field.type}
    if field.var is not None:
        attrs["var"] = field.var
    if field.label is not None:
        attrs["label"] = field.label
    el = Element(FIELD, attrs)
    if field.required:
        SubElement(el, ns.qname(ns.DATA_FORMS, "required"))
    for value in field.values:
        SubElement(el, VALUE).text = value
    for option in field.options:
        SubElement(SubElement(el, ns.qname(ns.DATA_FORMS, "option")), VALUE).text = option
    return el


def find_form(parent: Element, form_type: str | None = None) -> Element | None:
    """The first form child of `parent` (with that FORM_TYPE, if given)."""
    for x in parent.iterfind(X):
        if form_type is None or form_type_of(x) == form_type:
            return x
    return None


def read_form(x: Element) -> dict[str, list[str]]:
    """Submitted values by field name; fields without a name (fixed text) are skipped."""
    values: dict[str, list[str]] = {}
    for field in x.iterfind(FIELD):
        var = field.get("var")
        if var:
            values.setdefault(var, []).extend(v.text or "" for v in field.iterfind(VALUE))
    return values


def form_type_of(x: Element) -> str | None:
    """The XEP-0068 FORM_TYPE of a form; a submitted form may leave out type='hidden'."""
    for field in x.iterfind(FIELD):
        if field.get("var") == FORM_TYPE and field.get("type", "hidden") == "hidden":
            return field.findtext(VALUE)
    return None


def first_value(values: dict[str, list[str]], var: str) -> str | None:
    """The value of a single-valued field, or None when it was not submitted."""
    found = values.get(var)
    return found[0] if found else None
