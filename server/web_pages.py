"""The server's own web pages (the web admin, a user's account page, an invitation): one page layout with a
plain style sheet, and the escaping, form and table helpers they are written with.

Pages are rendered on the server, readable without scripts and by keyboard: every field has its label,
every table its header cells, every page its heading, and the one navigation is a list of links. Whatever
comes from outside (a JID, a room's subject, a command's result) goes through `esc` on its way in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from aiohttp import web

# No scripts from anywhere, styles only inline (the one sheet below), forms only to ourselves, no framing.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fafafa;line-height:1.4}
header{background:#0d47a1;color:#fff;padding:.5em 1em;display:flex;flex-wrap:wrap;gap:1em;align-items:center}
header a{color:#fff}header .who{margin-left:auto}header form{display:inline}
nav ul{list-style:none;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:.2em 1em}
main{max-width:72em;margin:auto;padding:1em}
a:focus,button:focus,input:focus,select:focus,textarea:focus{outline:3px solid #ffab00;outline-offset:1px}
table{border-collapse:collapse;margin:.5em 0;background:#fff}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#eceff1}
label{display:inline-block;min-width:12em;font-weight:600}
.field{margin:.4em 0}.hint{color:#555;font-size:.9em}
button{padding:.4em 1em;border:1px solid #0d47a1;background:#1565c0;color:#fff;border-radius:3px;cursor:pointer}
button.danger{background:#b71c1c;border-color:#7f0000}
.error{color:#b00020;font-weight:600}.ok{color:#1b5e20;font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(22em,1fr));gap:1em}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:.5em}figcaption{font-weight:600}
.inline{display:inline}
.skip{position:absolute;left:-10000px}.skip:focus{position:static;background:#fff;color:#0d47a1;padding:.3em}
"""


def esc(value: object) -> str:
    """`value` as HTML text or attribute value (quotes escaped too)."""
    return escape(str(value), quote=True)


def page(title: str, body: str, *, status: int = 200, nav: Sequence[tuple[str, str]] = (),
         header: str = "", lang: str = "en", site: str = "Parley") -> web.Response:
    """A whole page: `site` and the navigation links (href, text) on top, then `title` as its heading and
    `body` (HTML, escaped by whoever wrote it); `header` is extra HTML at the header's end (who is logged in)."""
    links = "".join(f"<li><a href='{esc(href)}'>{esc(text)}</a></li>" for href, text in nav)
    menu = f"<nav aria-label='Main'><ul>{links}</ul></nav>" if links else ""
    text = (f"<!DOCTYPE html><html lang='{esc(lang)}'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)} - {esc(site)}</title><style>{CSS}</style></head><body>"
            "<a class='skip' href='#main'>Skip to the content</a>"
            f"<header><strong>{esc(site)}</strong>{menu}{header}</header>"
            f"<main id='main'><h1>{esc(title)}</h1>\n{body}\n</main></body></html>")
    return web.Response(status=status, text=text, content_type="text/html", headers=HEADERS)


def redirect(location: str) -> web.Response:
    """303 See Other: where a page goes after a form's POST (and the login form when nobody is logged in)."""
    return web.Response(status=303, headers={**HEADERS, "Location": location})


def message(text: str, *, error: bool = False) -> str:
    """A line that assistive technology announces: an alert for an error, a status otherwise."""
    return (f"<p role='alert' class='error'>{esc(text)}</p>" if error
            else f"<p role='status' class='ok'>{esc(text)}</p>")


def field(name: str, label: str, *, kind: str = "text", value: str = "", required: bool = False,
          options: Sequence[str] = (), hint: str = "", autocomplete: str = "", ident: str = "") -> str:
    """One labelled form field: `kind` is an input type, 'textarea' or 'select' (of `options`); `ident` makes
    its id unique when two forms of a page have a field of the same name."""
    ident = f"f-{esc(ident or name)}"
    attrs = f"id='{ident}' name='{esc(name)}'" + (" required" if required else "")
    if autocomplete:
        attrs += f" autocomplete='{esc(autocomplete)}'"
    if hint:
        attrs += f" aria-describedby='{ident}-hint'"
    if kind == "textarea":
        control = f"<textarea {attrs} rows='4' cols='50'>{esc(value)}</textarea>"
    elif kind == "select":
        choices = "".join(f"<option{' selected' if o == value else ''}>{esc(o)}</option>" for o in options)
        control = f"<select {attrs}>{choices}</select>"
    else:
        shown = "" if kind == "password" else f" value='{esc(value)}'"
        control = f"<input {attrs} type='{esc(kind)}'{shown}>"
    note = f" <span class='hint' id='{ident}-hint'>{esc(hint)}</span>" if hint else ""
    return f"<div class='field'><label for='{ident}'>{esc(label)}</label> {control}{note}</div>"


def form(action: str, fields: Iterable[str], submit: str, csrf: str, *, danger: bool = False,
         inline: bool = False, method: str = "post") -> str:
    """A form posting `fields` (HTML from `field`, or hidden inputs) and the CSRF field `csrf` to `action`."""
    cls = " class='inline'" if inline else ""
    button = f"<button type='submit'{' class=danger' if danger else ''}>{esc(submit)}</button>"
    return f"<form method='{method}' action='{esc(action)}'{cls}>{csrf}{''.join(fields)}{button}</form>"


def hidden(name: str, value: str) -> str:
    return f"<input type='hidden' name='{esc(name)}' value='{esc(value)}'>"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], caption: str = "") -> str:
    """A table with a header row; the cells of `rows` are HTML already (escape text with `esc`)."""
    head = "".join(f"<th scope='col'>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
