// faceaudit look-up page: consent first, a file or a camera photo, plain-language results, the
// erasure request, and the k-anonymous identifier look-up (SHA-256 in the browser, 5 hex sent).
// Served from the service itself ('self'); no third-party code. Without JavaScript the search
// form posts to /search and the service answers with an HTML page.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const consent = $("consent");
  const results = $("results");
  let records = [];

  function text(tag, content, cls) {
    const el = document.createElement(tag);
    el.textContent = content;
    if (cls) el.className = cls;
    return el;
  }

  function consentGiven() {
    if (consent.checked) {
      $("consent-needed").hidden = true;
      return true;
    }
    $("consent-needed").hidden = false;
    consent.focus();
    return false;
  }

  function describe(data) {
    results.replaceChildren();
    const searched = (data.datasets_searched || []).map((d) => d.name);
    if (data.error) {
      results.append(text("p", data.error, "warning"));
      return;
    }
    if (data.status === "no_face" || !data.faces || data.faces.length === 0) {
      results.append(text("p", "No face was found in this photo, so nothing was searched. " +
        "Try a photo where your face is large, lit and facing the camera."));
      return;
    }
    records = [];
    data.faces.forEach((face, i) => {
      const lead = data.faces.length > 1 ? "Face " + (i + 1) + ": " : "";
      const strong = face.datasets.filter((d) => d.band === "strong");
      const possible = face.datasets.filter((d) => d.band === "possible");
      if (strong.length) {
        const n = strong.reduce((a, d) => a + d.images, 0);
        const p = document.createElement("p");
        p.append(lead, text("strong", "your face appears in " + n + " image(s) of these data sets:"));
        results.append(p);
        const ul = document.createElement("ul");
        strong.forEach((d) => ul.append(text("li", d.name + " (" + (d.version ? "version " + d.version + ", " : "") +
          "licence " + d.license + "): " + d.images + " image(s)")));
        results.append(ul);
      } else {
        const p = document.createElement("p");
        p.append(lead, text("strong", "no match in these " + searched.length + " data sets"),
          " (" + searched.join(", ") + ").");
        results.append(p);
      }
      if (possible.length) {
        results.append(text("p", "Possible matches (a looser threshold: this may be someone who looks like you):"));
        const ul = document.createElement("ul");
        possible.forEach((d) => ul.append(text("li", d.name + ": " + d.images + " image(s)")));
        results.append(ul);
      }
      face.matches.forEach((m) => { if (!records.includes(m.record)) records.push(m.record); });
    });
    $("erasure").hidden = records.length === 0;
    $("receipt").replaceChildren();
  }

  async function search(blob, name) {
    if (!consentGiven()) return;
    const body = new FormData();
    body.append("consent", "yes");
    body.append("results", "datasets");
    body.append("photo", blob, name || "photo.jpg");
    results.replaceChildren(text("p", "Searching..."));
    try {
      const response = await fetch("/v1/search", { method: "POST", body: body, credentials: "omit" });
      const data = await response.json();
      if (response.status === 429 || response.status === 503) {
        const wait = response.headers.get("Retry-After") || "a few";
        results.replaceChildren(text("p", data.error + " (try again in " + wait + " seconds)", "warning"));
        return;
      }
      describe(data);
    } catch (err) {
      results.replaceChildren(text("p", "The search did not complete; nothing was kept. Please try again.", "warning"));
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!consentGiven()) return;
    const file = $("photo").files[0];
    if (!file) {
      results.replaceChildren(text("p", "Choose a photo first.", "warning"));
      return;
    }
    search(file, file.name);
  });

  // the camera: a still from getUserMedia, drawn on a canvas, sent as a JPEG
  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
    $("camera").hidden = false;
    const video = $("camera-video");
    let stream = null;
    $("camera-start").addEventListener("click", async () => {
      if (!consentGiven()) return;
      try {
        stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "user" }, audio: false });
        video.srcObject = stream;
        video.hidden = false;
        await video.play();
        $("camera-take").hidden = false;
        $("camera-take").focus();
      } catch (err) {
        results.replaceChildren(text("p", "The camera could not be opened; choose a file instead.", "warning"));
      }
    });
    $("camera-take").addEventListener("click", () => {
      if (!consentGiven() || !stream) return;
      const canvas = document.createElement("canvas");
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
      canvas.getContext("2d").drawImage(video, 0, 0);
      stream.getTracks().forEach((t) => t.stop());
      stream = null;
      video.hidden = true;
      $("camera-take").hidden = true;
      canvas.toBlob((blob) => search(blob, "camera.jpg"), "image/jpeg", 0.92);
    });
  }

  $("erasure-button").addEventListener("click", async () => {
    const contact = $("contact").value.trim();
    const payload = { records: records };
    if (contact) payload.contact = contact;
    const receipt = $("receipt");
    try {
      const response = await fetch("/v1/erasure-requests", {
        method: "POST", credentials: "omit",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload),
      });
      const data = await response.json();
      if (!response.ok) {
        receipt.replaceChildren(text("p", data.error, "warning"));
        return;
      }
      const p = document.createElement("p");
      p.append("Your request was received. Request ", text("code", data.request_id),
        ", status ", text("strong", data.status), ". Keep this number to check its status.");
      receipt.replaceChildren(p);
    } catch (err) {
      receipt.replaceChildren(text("p", "The request did not go through; please try again.", "warning"));
    }
  });

  // identifier look-up: only the first 5 hex characters of the SHA-256 leave the browser
  function normalUrl(raw) {
    const u = new URL(raw.trim());
    u.hash = "";
    u.username = "";
    u.password = "";
    return u.href;
  }

  async function sha256Hex(bytes) {
    const digest = await crypto.subtle.digest("SHA-256", bytes);
    return Array.from(new Uint8Array(digest)).map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  $("ident-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = $("ident-result");
    let hex;
    try {
      const file = $("ident-file").files[0];
      const url = $("ident-url").value;
      if (file) hex = await sha256Hex(await file.arrayBuffer());
      else if (url) hex = await sha256Hex(new TextEncoder().encode(normalUrl(url)));
      else { out.replaceChildren(text("p", "Give a link or choose a file.", "warning")); return; }
    } catch (err) {
      out.replaceChildren(text("p", "That link could not be read.", "warning"));
      return;
    }
    const response = await fetch("/v1/source/range/" + hex.slice(0, 5), { credentials: "omit" });
    const data = await response.json();
    if (!response.ok) { out.replaceChildren(text("p", data.error, "warning")); return; }
    const found = data.matches.find((m) => m.suffix === hex.slice(5));
    if (found) {
      out.replaceChildren(text("p", "Found: this " + (($("ident-file").files[0]) ? "file" : "link") +
        " appears in " + found.datasets.join(", ") + "."));
    } else {
      out.replaceChildren(text("p", "Not found in the data sets this index holds."));
    }
  });
})();
