"""The page (``GET /``) and the pages of the no-JavaScript path, rendered here as plain HTML.

No template engine, no build step, no third-party asset: the script (``lookup.js``) and the style
sheet (``style.css``) are static files served from the service itself, so the Content-Security-Policy
``default-src 'self'`` holds. Everything inserted into the HTML is escaped; links are made only of
``http(s)`` contacts from the registry.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

HERE = Path(__file__).parent
STATIC = {"lookup.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_CACHE: dict[str, bytes] = {}

CANNOT = """
<ul>
  <li>Only the data sets listed below are searched; many others exist that this index does not hold.</li>
  <li>Only faces the detector finds are searched: a face that is small, turned away, covered or
      blurred may be missed, in your photo or in the data sets.</li>
  <li>Another face model may link photos this model does not. "No match" here is not proof that no
      photo of you is in these data sets.</li>
  <li>A "possible" match can be someone who looks like you. It says nothing about who you are.</li>
  <li>It makes no claim about age, and cannot tell a photo of a person from a photo of a photo.</li>
</ul>"""

ERASURE_REACH = """
<p>An erasure removes the faces you name from <strong>this index</strong>, the ingest runs it was
built from, and every export of it that the operator recorded; later rebuilds never bring them
back. It <strong>cannot</strong> reach copies of these data sets already downloaded elsewhere, or
models already trained on them. For those, ask each data set's maintainer (links below, where
one is known).</p>"""


def static_file(name: str) -> tuple[bytes, str] | None:
    if name not in STATIC:
        return None
    if name not in _CACHE:
        _CACHE[name] = (HERE / name).read_bytes()
    return _CACHE[name], STATIC[name]


def _layout(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{escape(title)}</title>
<link rel="stylesheet" href="/static/style.css">
</head>
<body>
<main id="main">
{body}
</main>
</body>
</html>
"""


def _version(d: dict) -> str:
    return f"version {escape(str(d['version']))}, " if d.get("version") else ""


def _dataset_list(datasets: list[dict]) -> str:
    items = []
    for d in datasets:
        contact = d.get("contact") or ""
        link = ""
        if contact.startswith(("https://", "http://")):
            link = f' &middot; <a href="{escape(contact)}" rel="noreferrer noopener">removal route</a>'
        elif contact:
            link = f" &middot; removal: {escape(contact)}"
        items.append(
            f"<li><strong>{escape(d['name'])}</strong> ({_version(d)}"
            f"licence {escape(str(d['license']))}; {int(d.get('images', 0))} images){link}</li>"
        )
    return (
        '<ul class="datasets">' + "".join(items) + "</ul>" if items else "<p>No data sets are loaded yet.</p>"
    )


def main_page(datasets: list[dict], version: str | None, config) -> str:
    limit_mb = config.max_upload_bytes / (1 << 20)
    body = f"""
<h1>Is your face in an openly shared face data set?</h1>
<p class="lead">Many face data sets were collected from the web and from cameras without asking the
people in them. This page checks a photo of you against the {len(datasets)} data set(s) listed
below{f" (index version <code>{escape(version)}</code>)" if version else ""}.</p>

<section aria-labelledby="consent-h">
<h2 id="consent-h">1. Your consent</h2>
<p>Your photo is sent to this service, searched once in memory, and dropped: it is not stored, not
logged, and not used for anything else. Only use a photo of yourself, or of someone who asked you to.</p>
<form id="search-form" action="/search" method="post" enctype="multipart/form-data">
  <p class="consent"><input type="checkbox" id="consent" name="consent" value="yes">
  <label for="consent">I agree: search this photo once and keep nothing.</label></p>
  <h2 id="photo-h">2. A photo of your face</h2>
  <p><label for="photo">Choose a photo (JPEG, PNG or WebP, at most {limit_mb:.0f} MB)</label><br>
  <input type="file" id="photo" name="photo" accept="image/*"></p>
  <input type="hidden" name="results" value="datasets">
  <p><button type="submit" id="search-button">Search this photo</button></p>
</form>
<div id="camera" class="camera" hidden>
  <p><button type="button" id="camera-start">Use the camera instead</button></p>
  <video id="camera-video" playsinline muted hidden aria-label="camera preview"></video>
  <p><button type="button" id="camera-take" hidden>Take the photo and search it</button></p>
</div>
<p id="consent-needed" class="warning" role="alert" hidden>Please give your consent first:
nothing was sent.</p>
</section>

<section aria-labelledby="results-h" id="results-section">
<h2 id="results-h">3. Results</h2>
<div id="results" aria-live="polite"><p>Results appear here after a search.</p></div>
<div id="erasure" hidden>
  <h3>Ask for erasure</h3>
  {ERASURE_REACH}
  <p><label for="contact">How to reach you about it (optional)</label><br>
  <input type="text" id="contact" name="contact" autocomplete="email" maxlength="320"></p>
  <p><button type="button" id="erasure-button">Ask to erase the matched faces</button></p>
  <div id="receipt" aria-live="polite"></div>
</div>
</section>

<section aria-labelledby="ident-h">
<h2 id="ident-h">Look up a link or a file without sending it</h2>
<p>Your browser computes the SHA-256 of the link (or of the file's bytes) and sends only its first
5 characters; the service answers every known entry with that start, and your browser compares
them here. The service never learns which link or file you checked.</p>
<noscript><p class="warning">This look-up needs JavaScript, because the hashing happens in
your browser.</p></noscript>
<form id="ident-form">
  <p><label for="ident-url">A link to a photo of you (for example on a photo-sharing site)</label><br>
  <input type="url" id="ident-url" name="url" inputmode="url"></p>
  <p><label for="ident-file">or a file (it is hashed here, not uploaded)</label><br>
  <input type="file" id="ident-file"></p>
  <p><button type="submit">Look it up</button></p>
</form>
<div id="ident-result" aria-live="polite"></div>
</section>

<section aria-labelledby="cannot-h">
<h2 id="cannot-h">What this cannot check</h2>
{CANNOT}
</section>

<section aria-labelledby="ds-h">
<h2 id="ds-h">The data sets searched</h2>
{_dataset_list(datasets)}
</section>
<script src="/static/lookup.js"></script>
"""
    return _layout("Is your face in a face data set? - faceaudit", body)


def _summary(data: dict) -> str:
    searched = data.get("datasets_searched", [])
    names = ", ".join(escape(d["name"]) for d in searched)
    if data.get("status") == "no_face" or not data.get("faces"):
        return (
            "<p>No face was found in this photo, so nothing was searched. Try a photo where your face "
            "is large, lit and facing the camera.</p>"
        )
    parts = []
    for i, face in enumerate(data["faces"], 1):
        strong = [d for d in face["datasets"] if d["band"] == "strong"]
        possible = [d for d in face["datasets"] if d["band"] == "possible"]
        lead = f"Face {i}: " if len(data["faces"]) > 1 else ""
        if strong:
            n = sum(d["images"] for d in strong)
            items = "".join(
                f"<li>{escape(d['name'])} ({_version(d)}licence {escape(d['license'])}): "
                f"{d['images']} image(s)</li>"
                for d in strong
            )
            parts.append(
                f"<p>{lead}<strong>your face appears in {n} image(s) of these data sets:</strong></p>"
                f"<ul>{items}</ul>"
            )
        else:
            parts.append(
                f"<p>{lead}<strong>no match in these {len(searched)} data sets</strong> ({names}).</p>"
            )
        if possible:
            items = "".join(f"<li>{escape(d['name'])}: {d['images']} image(s)</li>" for d in possible)
            parts.append(
                "<p>Possible matches (a looser threshold: this may be someone who looks like you):</p>"
                f"<ul>{items}</ul>"
            )
    return "".join(parts)


def result_page(data: dict, datasets: list[dict]) -> str:
    """The no-JavaScript result: the same summary as the script shows, and the erasure form."""
    records = sorted({m["record"] for f in data.get("faces", []) for m in f["matches"]})
    form = ""
    if records:
        hidden = "".join(f'<input type="hidden" name="record" value="{escape(r)}">' for r in records)
        form = f"""<h2>Ask for erasure</h2>{ERASURE_REACH}
<form action="/erasure-requests" method="post">{hidden}
<p><label for="contact">How to reach you about it (optional)</label><br>
<input type="text" id="contact" name="contact" maxlength="320"></p>
<p><button type="submit">Ask to erase the matched faces</button></p></form>"""
    body = f"""<h1>Results</h1>
<div id="results">{_summary(data)}</div>
{form}
<h2>What this cannot check</h2>{CANNOT}
<h2>The data sets searched</h2>{_dataset_list(datasets)}
<p><a href="/">Search another photo</a></p>"""
    return _layout("Results - faceaudit", body)


def receipt_page(created: dict, datasets: list[dict]) -> str:
    rid = escape(created["request_id"])
    body = f"""<h1>Your erasure request was received</h1>
<p id="receipt">Request <code>{rid}</code>, status <strong>{escape(created["status"])}</strong>.
Keep this number: <a href="/v1/erasure-requests/{rid}">its status</a> changes once an operator
has acted on it.</p>{ERASURE_REACH}{_dataset_list(datasets)}
<p><a href="/">Back</a></p>"""
    return _layout("Erasure request received - faceaudit", body)


def error_page(message: str, status: int) -> str:
    body = f"""<h1>That did not work</h1>
<p class="warning" role="alert">{escape(message)}</p>
<p><a href="/">Back to the search</a></p>"""
    return _layout(f"Error {status} - faceaudit", body)
