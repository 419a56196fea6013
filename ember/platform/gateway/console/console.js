// Ember console: a dependency-free page over the gateway's authenticated API.
// The API key lives in this closure only (never localStorage, sessionStorage or a cookie).
"use strict";

(function () {
  let apiKey = null;
  let role = null;
  let timer = null;
  let budgetLoaded = false;
  const REFRESH_MS = 2000;
  const $ = (id) => document.getElementById(id);

  // --- DOM helpers (text only: nothing from the API is parsed as HTML) -------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "style") Object.assign(el.style, v);  // CSSOM: the page's CSP forbids inline style attributes
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const fmt = (x, digits = 1) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toFixed(digits);
  const ms = (x) => (x === null || x === undefined) ? "–" : (x >= 100 ? fmt(x, 0) : fmt(x, 1));
  const pct = (x) => (x === null || x === undefined) ? "–" : fmt(100 * x, 1) + "%";
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return fmt(n, n >= 100 || i === 0 ? 0 : 1) + " " + units[i];
  }
  // A horizontal gauge; `highIsGood` for attainment-like values (else filling up is the warning).
  function bar(value, max, marker, highIsGood) {
    const frac = max > 0 ? Math.min(1, Math.max(0, value / max)) : 0;
    const level = highIsGood ? (frac < 0.9 ? " bad" : frac < 0.99 ? " warn" : "") : (frac > 0.95 ? " bad" : frac > 0.8 ? " warn" : "");
    const b = h("div", { class: "bar" + level }, h("span", { style: { width: `${(100 * frac).toFixed(1)}%` } }));
    if (marker && max > 0) b.appendChild(h("i", { style: { left: `${Math.min(100, 100 * marker / max).toFixed(1)}%` } }));
    return b;
  }

  // --- API --------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  async function api(method, path, body) {
    const init = { method, headers: { "Authorization": "Bearer " + apiKey }, cache: "no-store",
                   credentials: "omit", referrerPolicy: "no-referrer" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      const msg = data && data.error ? data.error.message : `HTTP ${resp.status}`;
      throw new ApiError(resp.status, msg);
    }
    return data;
  }

  // --- login --------------------------------------------------------------------------------
  async function login(ev) {
    ev.preventDefault();
    const input = $("login-key");
    apiKey = input.value.trim();
    input.value = "";
    $("login-error").textContent = "";
    try {
      const me = await api("GET", "/v1/me");
      role = me.role;
      $("whoami").textContent = `${me.name || me.id} · ${me.role}`;
      for (const id of ["whoami", "logout", "live", "app"]) $(id).hidden = false;
      $("login").hidden = true;
      setupBudgetForm();
      await refresh();
      timer = setInterval(refresh, REFRESH_MS);
    } catch (e) {
      apiKey = null;
      $("login-error").textContent = e.status === 401 ? "That key was not accepted." : `Sign-in failed: ${e.message}`;
    }
  }
  function logout() {
    apiKey = null; role = null; budgetLoaded = false;
    if (timer) clearInterval(timer);
    timer = null;
    for (const id of ["whoami", "logout", "live", "app"]) $(id).hidden = true;
    $("login").hidden = false;
  }
  const canOperate = () => role === "admin" || role === "operator";

  // --- refresh ------------------------------------------------------------------------------
  async function refresh() {
    if (!apiKey) return;
    const [fns, nodes, energy] = await Promise.allSettled([
      loadFunctions(), canOperate() ? api("GET", "/v1/nodes") : Promise.reject(new ApiError(403, "")),
      canOperate() ? api("GET", "/v1/energy") : Promise.reject(new ApiError(403, "")),
    ]);
    if (!apiKey) return;
    const ok = fns.status === "fulfilled";
    $("live").classList.toggle("stale", !ok);
    $("live-text").textContent = ok ? "live · " + new Date().toLocaleTimeString() : "not updating";
    if (ok) renderFunctions(fns.value);
    if (nodes.status === "fulfilled") renderNodes(nodes.value);
    else renderDenied("nodes", "nodes-note", nodes.reason);
    renderBudget(energy.status === "fulfilled" ? energy.value : null, energy.reason);
    renderTiles(ok ? fns.value : null, nodes.status === "fulfilled" ? nodes.value : null,
                energy.status === "fulfilled" ? energy.value : null);
  }
  async function loadFunctions() {
    try {
      return await api("GET", "/v1/stats/functions");
    } catch (e) {
      if (e.status !== 403) throw e;
      const models = await api("GET", "/v1/models");  // invokers see names only
      return { limited: true, functions: models.data.map((m) => ({ name: m.id })) };
    }
  }

  function renderTiles(fns, nodes, energy) {
    const tiles = [];
    if (fns) {
      const list = fns.functions || [];
      const ready = list.reduce((n, f) => n + ((f.instance_states || {}).ready || 0), 0);
      const colds = list.reduce((n, f) => n + Object.values(f.cold_starts || {}).reduce((a, b) => a + b, 0), 0);
      tiles.push(["Functions", list.length, fns.limited ? "names only for this role" : `${ready} instance${ready === 1 ? "" : "s"} ready`]);
      if (!fns.limited) tiles.push(["Cold starts", colds, "since this gateway started"]);
    }
    if (nodes) {
      const up = nodes.nodes.filter((n) => n.up).length;
      const devs = nodes.nodes.reduce((n, x) => n + x.devices.length, 0);
      tiles.push(["Nodes up", `${up} / ${nodes.nodes.length}`, `${devs} device${devs === 1 ? "" : "s"}`]);
    }
    if (energy) {
      const power = energy.devices.reduce((w, d) => w + (d.power_w || 0), 0);
      const budget = energy.budget.cluster_watts;
      tiles.push(["GPU power", energy.devices.length ? fmt(power, 0) + " W" : "–",
                  energy.devices.length ? (budget ? `budget ${fmt(budget, 0)} W` : "no power budget") : "no GPU monitored"]);
      tiles.push(["Energy today", fmt(energy.allocation.used_kwh_today, 3) + " kWh",
                  `projected ${fmt(energy.projected_kwh_today, 2)} kWh`]);
    }
    $("tiles").replaceChildren(...tiles.map(([label, value, sub]) =>
      h("div", { class: "tile" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value),
        h("div", { class: "sub" }, sub))));
  }

  function renderFunctions(data) {
    const body = $("functions").querySelector("tbody");
    const rows = (data.functions || []).map((f) => {
      if (data.limited) {
        return h("tr", { "data-function": f.name }, h("td", {}, h("b", {}, f.name)),
          h("td", { colspan: 8, class: "muted" }, "statistics need an admin, operator or developer key"));
      }
      const states = Object.entries(f.instance_states || {}).map(([s, n]) => h("span", { class: "pill " + s }, `${n} ${s}`));
      const tiers = [...new Set((f.instances || []).map((i) => i.tier))].map((t) => h("span", { class: "pill " + t }, t));
      const cold = Object.entries(f.cold_starts || {}).map(([t, n]) => h("span", { class: "pill " + t }, `${t} ${n}`));
      const target = f.slo ? `target TTFT ≤ ${f.slo.ttft_ms} ms, TPOT ≤ ${f.slo.tpot_ms} ms` : "";
      const att = f.slo_attainment;
      return h("tr", { "data-function": f.name },
        h("td", {}, h("b", {}, f.name), h("div", { class: "muted small" }, `checkpoint ${f.checkpoint}`)),
        h("td", { class: "instances" }, states.length ? states : h("span", { class: "muted" }, "scaled to zero")),
        h("td", { class: "tier" }, tiers.length ? tiers : "–"),
        h("td", { class: "num" }, f.outstanding ?? 0),
        h("td", { class: "num" }, `${ms(f.ttft_ms.p50)} / ${ms(f.ttft_ms.p99)} ms`),
        h("td", { class: "num" }, `${ms(f.tpot_ms.p50)} / ${ms(f.tpot_ms.p99)} ms`),
        h("td", {}, h("div", { class: "barrow" }, att === null ? h("span", { class: "muted" }, "no requests") :
          [bar(att, 1, null, true), h("span", { class: "num" }, pct(att))]), h("div", { class: "muted small" }, target)),
        h("td", { class: "cold" }, cold.length ? cold : h("span", { class: "muted" }, "none")),
        h("td", { class: "num" }, fmt(f.j_per_token, 3)));
    });
    body.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No functions deployed."))]));
    $("functions-note").textContent = data.limited ? "" :
      `${data.functions.length} deployed · latency window: last requests seen by gateway ${data.gateway}`;
  }

  function renderDenied(containerId, noteId, reason) {
    const msg = reason && reason.status === 403 ? "Visible to admin and operator keys." : `Could not load: ${reason && reason.message}`;
    $(containerId).replaceChildren(h("div", { class: "empty" }, msg));
    $(noteId).textContent = "";
  }

  function renderNodes(data) {
    const cards = data.nodes.map((n) => {
      if (!n.up) {
        return h("div", { class: "node", "data-node": n.node }, h("div", { class: "node-head" }, h("h3", {}, n.node),
          h("span", { class: "pill down" }, "heartbeat lapsed")));
      }
      const devRows = n.devices.map((d) => h("tr", { "data-device": d.device },
        h("td", {}, d.device),
        h("td", {}, h("div", { class: "barrow" }, bar(d.claimed_bytes, d.memory_bytes),
          h("span", { class: "num" }, `${bytes(d.claimed_bytes)} / ${bytes(d.memory_bytes)}`))),
        h("td", {}, d.instances.length ? d.instances.map((i) => h("span", { class: "pill " + i.state },
          `${i.function} · ${i.state}${i.outstanding ? " · " + i.outstanding + " busy" : ""}`)) : h("span", { class: "muted" }, "idle"))));
      const energyRows = n.energy.map((e) => {
        const limit = e.limit_w || 0;
        return h("tr", { "data-energy-device": e.device },
          h("td", {}, e.device),
          h("td", {}, h("div", { class: "barrow" }, bar(e.power_w || 0, limit, e.cap_w),
            h("span", { class: "num" }, `${fmt(e.power_w, 0)} / ${fmt(limit, 0)} W${e.cap_w ? ` (cap ${fmt(e.cap_w, 0)})` : ""}`))),
          h("td", { class: "num" }, `${fmt(e.sm_clock_mhz, 0)} MHz`),
          h("td", { class: "num" }, `${fmt(e.energy_j / 1000, 2)} kJ`),
          h("td", { class: "num" }, `${fmt(e.j_per_token, 3)} J/tok`),
          h("td", { class: "num" }, pct(e.slo_attainment)));
      });
      const tierRow = (name, items) => [h("div", { class: "t" }, name),
        h("div", {}, items && items.length ? items.map((c) => h("span", { class: "pill " + name }, c)) : h("span", { class: "muted" }, "–"))];
      return h("div", { class: "node", "data-node": n.node },
        h("div", { class: "node-head" }, h("h3", {}, n.node),
          h("span", { class: "muted" }, !n.energy.length ? "no power readings" : n.power_budget_w ?
            `${fmt(n.power_w, 0)} W of ${fmt(n.power_budget_w, 0)} W budget` : `${fmt(n.power_w, 0)} W GPU power`)),
        h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "device"), h("th", {}, "memory claimed"), h("th", {}, "instances"))),
          h("tbody", {}, devRows)),
        energyRows.length ? h("table", { class: "energy" }, h("thead", {}, h("tr", {}, h("th", {}, "GPU"),
          h("th", {}, "power / limit"), h("th", { class: "num" }, "SM clock"), h("th", { class: "num" }, "energy"),
          h("th", { class: "num" }, "J/token"), h("th", { class: "num" }, "SLO"))), h("tbody", {}, energyRows))
          : h("div", { class: "muted" }, "No energy monitor on this node (no GPU and no simulated GPUs)."),
        h("div", { class: "tiers" }, tierRow("device", n.tiers.device), tierRow("dram", n.tiers.dram), tierRow("ssd", n.tiers.ssd)));
    });
    $("nodes").replaceChildren(...(cards.length ? cards : [h("div", { class: "empty" }, "No nodes registered.")]));
    $("nodes-note").textContent = `${data.nodes.filter((n) => n.up).length} up`;
  }

  // --- budget -------------------------------------------------------------------------------
  function setupBudgetForm() {
    const allowed = canOperate();
    for (const id of ["budget-cluster-watts", "budget-node-watts", "budget-kwh", "budget-save"]) $(id).disabled = !allowed;
    $("budget-note").textContent = allowed ? "" : `read-only for the ${role} role (admin or operator may set it)`;
    setStatus(allowed ? "" : "Setting the budget needs an admin or operator key.", allowed ? "" : "bad");
  }
  function setStatus(text, cls) {
    const s = $("budget-status");
    s.textContent = text;
    s.className = "status " + (cls || "");
  }
  function renderBudget(energy, reason) {
    const view = $("budget-view");
    if (!energy) {
      view.replaceChildren(h("div", { class: "k" }, "budget"), h("div", {},
        reason && reason.status === 403 ? "visible to admin and operator keys" : `could not load: ${reason && reason.message}`));
      return;
    }
    const b = energy.budget;
    const power = energy.devices.reduce((w, d) => w + (d.power_w || 0), 0);
    const nodeW = Object.entries(b.node_watts || {}).map(([n, w]) => `${n}=${w}`).join(", ");
    const pairs = [
      ["cluster power", b.cluster_watts ? h("div", { class: "barrow" }, bar(power, b.cluster_watts),
        h("span", { class: "num", id: "budget-cluster-value" }, `${fmt(power, 0)} W of ${fmt(b.cluster_watts, 0)} W`))
        : h("span", { id: "budget-cluster-value" }, "no limit")],
      ["per node", nodeW || "no limit"],
      ["energy per day", b.energy_kwh_per_day ? `${fmt(b.energy_kwh_per_day, 2)} kWh` : "no limit"],
      ["used today", `${fmt(energy.allocation.used_kwh_today, 4)} kWh`],
      ["projected today", `${fmt(energy.projected_kwh_today, 3)} kWh`],
      ["SLO misses", energy.allocation.misses.length ? energy.allocation.misses.map((m) => `${m.function} on ${m.node}/${m.device}: ${m.reason}`).join("; ") : "none"],
    ];
    view.replaceChildren(...pairs.flatMap(([k, v]) => [h("div", { class: "k" }, k), h("div", {}, v)]));
    if (!budgetLoaded) {  // fill the form once; later refreshes must not overwrite what is being typed
      budgetLoaded = true;
      $("budget-cluster-watts").value = b.cluster_watts ?? "";
      $("budget-node-watts").value = nodeW;
      $("budget-kwh").value = b.energy_kwh_per_day ?? "";
    }
  }
  // "node=watts, ...": exactly one "=" per entry, a node id, and plain decimal watts that are a
  // finite number (no hex, no "400=9000", no 1e400 that JSON would send as null).
  const NODE_WATTS = /^([A-Za-z0-9._-]+)\s*=\s*(\d+(?:\.\d+)?)$/;
  function parseNodeWatts(text) {
    const out = {};
    for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
      const m = NODE_WATTS.exec(part);
      if (!m || !Number.isFinite(Number(m[2]))) throw new Error(`"${part}" is not node=watts (watts a decimal number)`);
      out[m[1]] = Number(m[2]);
    }
    return out;
  }
  function wattsOrNull(id) {
    const v = $(id).value.trim();
    if (v === "") return null;
    if (!/^\d+(?:\.\d+)?$/.test(v) || !Number.isFinite(Number(v))) throw new Error(`"${v}" is not a decimal number`);
    return Number(v);
  }
  // Sends the form's budget; the gateway decides who may (the page only mirrors that).
  async function setBudget(ev) {
    if (ev) ev.preventDefault();
    let body;
    try {
      body = { cluster_watts: wattsOrNull("budget-cluster-watts"),
               node_watts: parseNodeWatts($("budget-node-watts").value),
               energy_kwh_per_day: wattsOrNull("budget-kwh") };
    } catch (e) {
      setStatus(e.message, "bad");
      return;
    }
    setStatus("saving…", "");
    try {
      await api("PUT", "/v1/energy/budget", body);
      setStatus("Budget set at " + new Date().toLocaleTimeString() + ".", "ok");
      budgetLoaded = false;
      await refresh();
    } catch (e) {
      setStatus(`Refused (${e.status}): ${e.message}`, "bad");
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    $("budget-form").addEventListener("submit", setBudget);
    window.emberConsole = { setBudget };  // lets a test send the form even where the page disables it
  });
})();
