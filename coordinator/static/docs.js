// The microswarm API page: the catalogue from /openapi.json, Authorize, and "Try it out".
// No framework and nothing from the network but this coordinator; every text goes in with
// textContent, never as HTML.
"use strict";

(function () {
  const auth = { clientId: "", clientSecret: "", scope: "", access: "", refresh: "", expires: 0 };
  let doc = null;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  function pretty(v) { return JSON.stringify(v, null, 2); }

  function resolve(schema) {
    let s = schema || {};
    for (let i = 0; s.$ref && i < 20; i++) {
      const name = decodeURIComponent(s.$ref.split("/").pop());
      s = (doc.components.schemas || {})[name] || {};
    }
    return s;
  }

  // An example value from a JSON Schema: defaults and examples first, then the type's simplest value.
  function example(schema, depth) {
    const s = resolve(schema);
    depth = depth || 0;
    if (s.default !== undefined) return s.default;
    if (Array.isArray(s.examples) && s.examples.length) return s.examples[0];
    if (s.const !== undefined) return s.const;
    if (Array.isArray(s.enum) && s.enum.length) return s.enum[0];
    const alt = s.anyOf || s.oneOf;
    if (alt) return example(alt.find(a => resolve(a).type !== "null") || alt[0], depth + 1);
    const type = Array.isArray(s.type) ? s.type.find(t => t !== "null") : s.type;
    const low = s.minimum !== undefined ? s.minimum : (s.exclusiveMinimum !== undefined ? s.exclusiveMinimum + 1 : undefined);
    switch (type) {
      case "integer": return low !== undefined ? Math.ceil(low) : 1;
      case "number": return low !== undefined ? low : 1.5;
      case "boolean": return true;
      case "string":
        if (s.format === "date") return new Date().toISOString().slice(0, 10);
        if (s.format === "date-time") return new Date().toISOString().slice(0, 19);
        if (s.format === "base64url" || s.format === "binary") return "aGVsbG8=";
        return "text";
      case "array": return depth > 4 ? [] : [example(s.items || {}, depth + 1)];
      case "object": {
        const out = {};
        if (depth > 4) return out;
        for (const [k, v] of Object.entries(s.properties || {})) out[k] = example(v, depth + 1);
        return out;
      }
      default: return null;
    }
  }

  function typeLabel(schema) {
    const s = resolve(schema);
    if (s.enum) return "one of " + s.enum.map(String).join(", ");
    const alt = s.anyOf || s.oneOf;
    if (alt) return alt.map(typeLabel).join(" | ");
    let t = Array.isArray(s.type) ? s.type.join(" | ") : (s.type || "any");
    if (s.format) t += " (" + s.format + ")";
    const range = [];
    if (s.minimum !== undefined) range.push(">= " + s.minimum);
    if (s.exclusiveMinimum !== undefined) range.push("> " + s.exclusiveMinimum);
    if (s.maximum !== undefined) range.push("<= " + s.maximum);
    if (s.exclusiveMaximum !== undefined) range.push("< " + s.exclusiveMaximum);
    if (s.minLength !== undefined) range.push("length >= " + s.minLength);
    if (s.maxLength !== undefined) range.push("length <= " + s.maxLength);
    return range.length ? t + ", " + range.join(", ") : t;
  }

  function fieldsTable(schema) {
    const s = resolve(schema);
    const required = new Set(s.required || []);
    const rows = Object.entries(s.properties || {}).map(([name, p]) => el("tr", {},
      el("td", {}, el("code", { text: name })),
      el("td", { text: typeLabel(p) }),
      el("td", { text: required.has(name) ? "required" : "optional" }),
      el("td", { text: resolve(p).description || p.description || "" })));
    if (!rows.length) return el("p", { class: "hint", text: "no fields" });
    return el("table", {}, el("thead", {}, el("tr", {},
      el("th", { text: "field" }), el("th", { text: "type" }), el("th", { text: "" }), el("th", { text: "description" }))),
      el("tbody", {}, ...rows));
  }

  // ---------------------------------------------------------------- tokens

  function setState(text, kind) {
    const p = document.getElementById("auth-state");
    p.textContent = text;
    p.className = "state " + (kind || "");
  }

  async function tokenRequest(form) {
    const basic = btoa(encodeURIComponent(auth.clientId) + ":" + encodeURIComponent(auth.clientSecret));
    const r = await fetch("/oauth/token", {
      method: "POST", body: new URLSearchParams(form),
      headers: { "Authorization": "Basic " + basic, "Content-Type": "application/x-www-form-urlencoded" },
    });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((body.error || r.status) + ": " + (body.error_description || "refused"));
    auth.access = body.access_token;
    auth.refresh = body.refresh_token || "";
    auth.expires = Date.now() + 1000 * (body.expires_in || 3600);
    setState("Authorized as " + auth.clientId + " (scope " + (body.scope || "*") + "); the token expires in "
      + Math.round(body.expires_in || 3600) + " s.", "ok");
    document.getElementById("logout").hidden = false;
    return auth.access;
  }

  async function authorize() {
    const form = { grant_type: "client_credentials" };
    if (auth.scope) form.scope = auth.scope;
    return tokenRequest(form);
  }

  async function renew() {
    if (auth.refresh) {
      try { return await tokenRequest({ grant_type: "refresh_token", refresh_token: auth.refresh }); }
      catch (e) { auth.refresh = ""; }
    }
    return authorize();
  }

  async function currentToken() {
    if (!auth.access) return "";
    if (Date.now() > auth.expires - 5000 && auth.clientId) {
      try { await renew(); } catch (e) { setState("Could not renew the token: " + e.message, "error"); }
    }
    return auth.access;
  }

  async function logout() {
    if (auth.refresh || auth.access) {
      const basic = btoa(encodeURIComponent(auth.clientId) + ":" + encodeURIComponent(auth.clientSecret));
      for (const t of [auth.refresh, auth.access].filter(Boolean)) {
        await fetch("/oauth/revoke", { method: "POST", body: new URLSearchParams({ token: t }),
          headers: { "Authorization": "Basic " + basic, "Content-Type": "application/x-www-form-urlencoded" } })
          .catch(() => null);
      }
    }
    Object.assign(auth, { clientId: "", clientSecret: "", scope: "", access: "", refresh: "", expires: 0 });
    document.getElementById("client-secret").value = "";
    document.getElementById("logout").hidden = true;
    setState("Logged out: the tokens were revoked.", "");
  }

  // ---------------------------------------------------------------- calls

  async function execute(op, box) {
    const out = box.querySelector(".response");
    const status = box.querySelector(".response-status");
    const bodyPre = box.querySelector(".response-body");
    const curlPre = box.querySelector(".curl");
    let url = op.path;
    const init = { method: op.method.toUpperCase(), headers: {} };
    if (op.method === "get") {
      const q = new URLSearchParams();
      for (const input of box.querySelectorAll("input[data-param]")) {
        if (input.value !== "") q.append(input.dataset.param, input.value);
      }
      const qs = q.toString();
      if (qs) url += "?" + qs;
    } else {
      init.body = box.querySelector("textarea.request-body").value;
      init.headers["Content-Type"] = "application/json";
    }
    const send = async () => {
      const tok = await currentToken();
      if (tok) init.headers["Authorization"] = "Bearer " + tok; else delete init.headers["Authorization"];
      return fetch(url, init);
    };
    const t0 = performance.now();
    let r;
    try {
      r = await send();
      if (r.status === 401 && auth.clientId) { await renew(); r = await send(); }
    } catch (e) {
      out.hidden = false;
      status.textContent = "no answer: " + e.message;
      status.className = "response-status error";
      return;
    }
    const ms = performance.now() - t0;
    const text = await r.text();
    let shown = text;
    try { shown = pretty(JSON.parse(text)); } catch (e) { /* not JSON: show it as it came */ }
    out.hidden = false;
    status.textContent = r.status + " " + r.statusText + " · " + ms.toFixed(1) + " ms round trip";
    status.className = "response-status " + (r.ok ? "ok" : "error");
    bodyPre.textContent = shown;
    const full = location.origin + url;
    curlPre.textContent = "curl -X " + init.method + " '" + full + "' -H 'Authorization: Bearer $TOKEN'"
      + (init.body !== undefined ? " -H 'Content-Type: application/json' -d '" + init.body.replace(/'/g, "'\\''") + "'" : "");
  }

  function operationBox(op) {
    const o = op.spec;
    const box = el("div", { class: "body", hidden: true });
    if (o.description) box.append(el("p", { class: "desc", text: o.description }));
    if (op.path.startsWith("/oauth/")) {
      box.append(el("p", { class: "hint", text: "Use the Authorize box above: it calls this endpoint." }));
      return box;
    }
    let editor;
    if (op.method === "get") {
      box.append(el("h3", { text: "Query parameters" }));
      const rows = (o.parameters || []).map(p => el("tr", {},
        el("td", {}, el("code", { text: p.name })),
        el("td", { text: typeLabel(p.schema) + (p.required ? ", required" : "") }),
        el("td", {}, el("input", { "data-param": p.name, value: String(example(p.schema) ?? ""), disabled: true,
          "aria-label": p.name }))));
      editor = el("table", {}, el("tbody", {}, ...rows));
      box.append(editor);
    } else if (o.requestBody) {
      const schema = o.requestBody.content["application/json"].schema;
      box.append(el("h3", { text: "Input" }), fieldsTable(schema), el("h3", { text: "Request body" }));
      editor = el("textarea", { class: "request-body", spellcheck: "false", readonly: true,
        "aria-label": "request body" });
      editor.value = pretty(example(schema));
      box.append(editor);
    }
    const ok = ((o.responses || {})["200"] || {}).content;
    if (ok) {
      const env = resolve(ok["application/json"].schema);
      if (env.properties && env.properties.result) {
        box.append(el("h3", { text: "Result (inside the envelope)" }), fieldsTable(env.properties.result));
      }
    }
    const tryBtn = el("button", { class: "try secondary", type: "button", text: "Try it out" });
    const execBtn = el("button", { class: "execute", type: "button", text: "Execute", disabled: true });
    tryBtn.addEventListener("click", () => {
      for (const i of box.querySelectorAll("input[data-param]")) i.disabled = false;
      const ta = box.querySelector("textarea.request-body");
      if (ta) ta.readOnly = false;
      execBtn.disabled = false;
      tryBtn.disabled = true;
    });
    execBtn.addEventListener("click", () => execute(op, box));
    box.append(el("div", { class: "actions" }, tryBtn, execBtn));
    box.append(el("div", { class: "response", hidden: true },
      el("h3", { text: "Response" }), el("span", { class: "response-status" }),
      el("pre", { class: "response-body" }), el("h3", { text: "The same with curl" }), el("pre", { class: "curl" })));
    return box;
  }

  function render() {
    const root = document.getElementById("services");
    root.textContent = "";
    const groups = new Map();
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const method of ["post", "get"]) {
        if (!item[method]) continue;
        const spec = item[method];
        const tag = (spec.tags || ["other"])[0];
        if (!groups.has(tag)) groups.set(tag, []);
        groups.get(tag).push({ path, method, spec });
      }
    }
    const tags = (doc.tags || []).map(t => t.name);
    const order = [...groups.keys()].sort((a, b) => (tags.indexOf(a) + 1 || 999) - (tags.indexOf(b) + 1 || 999));
    let count = 0;
    for (const tag of order) {
      const section = el("section", { class: "group", id: "group-" + tag }, el("h2", { text: tag }));
      for (const op of groups.get(tag)) {
        if (op.path.startsWith("/v1/")) count += op.method === "post" ? 1 : 0;
        const head = el("button", { class: "head", type: "button", "aria-expanded": "false" },
          el("span", { class: "method " + op.method, text: op.method.toUpperCase() }),
          el("span", { class: "path", text: op.path }),
          el("span", { class: "summary", text: op.spec.summary || "" }));
        const box = operationBox(op);
        head.addEventListener("click", () => {
          box.hidden = !box.hidden;
          head.setAttribute("aria-expanded", String(!box.hidden));
        });
        section.append(el("div", { class: "op", id: "op-" + (op.spec.operationId || op.path) }, head, box));
      }
      root.append(section);
    }
    document.getElementById("intro").textContent = doc.info.title + " " + doc.info.version + ": " + count
      + " services. " + (doc.info.description || "");
    document.body.dataset.services = String(count);
  }

  async function load() {
    const r = await fetch("/openapi.json", { cache: "no-cache" });
    doc = await r.json();
    render();
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("auth-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      auth.clientId = document.getElementById("client-id").value.trim();
      auth.clientSecret = document.getElementById("client-secret").value;
      auth.scope = document.getElementById("scope").value.trim();
      setState("Authorizing…", "");
      try { await authorize(); } catch (e) { auth.access = ""; setState("Refused: " + e.message, "error"); }
    });
    document.getElementById("logout").addEventListener("click", logout);
    load().catch(e => {
      document.getElementById("intro").textContent = "Could not load /openapi.json: " + e.message;
    });
  });
})();
