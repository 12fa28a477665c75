// The hub dashboard: a single page over the hub's JSON API (no build step, no libraries).
//
// Views (the URL hash): #/ fleet, #/site/ID, #/site/ID/app/NAME,
// #/site/ID/app/NAME/instance/IID, #/apps, #/apps/NAME. The current view refreshes every
// REFRESH_MS (longer when fetching takes long). Every string from the hub reaches the page as text (never as HTML).
"use strict";

(() => {
  const TOKEN_KEY = "meshorch.hub.token";
  const REFRESH_MS = 5000;
  const REQUEST_TIMEOUT_MS = 15000;
  const DETAIL_PARALLEL = 8; // app details fetched at once (the app list has no progress)
  const LOG_LIMIT = 100;
  const ALERT_HISTORY = 50; // cleared alerts listed under History
  const TREND_ROWS = 50; // fleet rows that get sparklines (one request per site and period)
  const HEALTH_RANK = { unreachable: 0, degraded: 1, unknown: 2, healthy: 3 };
  const LEVELS = ["emerg", "alert", "crit", "error", "warning", "notice", "info", "debug"];

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    skewMs: 0, // hub clock minus browser clock, from the Date header
    timer: null,
    gen: 0, // bumped on each navigation: a refresh of an old view stops there
    update: null,
    trends: new Map(), // site -> {fetched (ms), data}: a site's trends change once per every_s
    trendsRefused: false, // a tenant token: the hub refuses trends (fleet-wide tokens only)
  };

  // -- small helpers -------------------------------------------------------------------

  const $ = (sel) => document.querySelector(sel);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child)); // text, never markup
    }
    return el;
  }

  const obj = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : {});
  const list = (v) => (Array.isArray(v) ? v : []);
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const text = (v, fallback = "—") => (v === null || v === undefined || v === "" ? fallback : String(v));
  const enc = encodeURIComponent;

  function hubNow() {
    return (Date.now() + state.skewMs) / 1000;
  }

  function age(t) {
    const at = num(t);
    if (at === null) return "never";
    let s = Math.max(0, Math.round(hubNow() - at));
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s ago`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
    return `${Math.floor(s / 86400)}d ago`;
  }

  function clock(t) {
    const at = num(t);
    return at === null ? "—" : new Date(at * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }

  function badge(value, kind = "health") {
    const v = text(value, "unknown");
    return h("span", { class: `badge ${kind}-${v.replace(/[^a-z0-9_-]/gi, "")}` }, v);
  }

  function labelChips(labels) {
    return Object.entries(obj(labels))
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`));
  }

  function table(id, headers, rows, empty) {
    if (!rows.length) return h("p", { class: "empty", id: id && `${id}-empty` }, empty);
    return h(
      "table",
      { id },
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
      h("tbody", {}, rows),
    );
  }

  async function mapLimit(items, limit, fn) {
    const out = new Array(items.length);
    let next = 0;
    const worker = async () => {
      while (next < items.length) {
        const i = next++;
        out[i] = await fn(items[i]);
      }
    };
    await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
    return out;
  }

  // -- the hub's API ---------------------------------------------------------------------

  class HubError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: abort.signal,
        cache: "no-store",
      });
    } catch (err) {
      const why = err && err.name === "AbortError" ? "timed out" : String(err && err.message);
      throw new HubError(0, "unreachable", `the hub did not answer (${why})`);
    } finally {
      clearTimeout(timer);
    }
    const date = Date.parse(resp.headers.get("Date") || "");
    if (!Number.isNaN(date)) {
      // The header has whole seconds: only a real skew is worth correcting.
      const skew = date - Date.now();
      state.skewMs = Math.abs(skew) > 2000 ? skew : 0;
    }
    let data = null;
    try {
      data = await resp.json();
    } catch {
      data = null; // not JSON: the status says enough
    }
    if (!resp.ok) {
      const error = obj(obj(data).error);
      const message = text(error.message, `${resp.status} ${resp.statusText}`);
      const problems = list(error.problems).join("; ");
      const err = new HubError(resp.status, text(error.code, `http_${resp.status}`), problems ? `${message}: ${problems}` : message);
      if (resp.status === 401) logout(`The hub refused the token: ${err.message}`);
      throw err;
    }
    return obj(data);
  }

  const get = (path) => api("GET", path);

  // Every item of a paginated listing (GET path -> {key: [...], next_cursor}), page after page.
  async function getAll(path, key) {
    const found = [];
    let cursor = null;
    do {
      const sep = path.includes("?") ? "&" : "?";
      const page = await get(`${path}${sep}limit=1000${cursor ? `&cursor=${enc(cursor)}` : ""}`);
      found.push(...list(page[key]));
      cursor = typeof page.next_cursor === "string" ? page.next_cursor : null;
    } while (cursor);
    return found;
  }

  function errorText(err) {
    if (err instanceof HubError) return `${err.code}: ${err.message}`;
    return String((err && err.message) || err);
  }

  // -- login -----------------------------------------------------------------------------

  function showLogin(message) {
    $("#main").hidden = true;
    $("#nav").hidden = true;
    $("#logout").hidden = true;
    $("#login").hidden = false;
    $("#status").textContent = "";
    const error = $("#login-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("#token").focus();
  }

  function logout(message) {
    state.token = null;
    state.gen++;
    clearTimeout(state.timer);
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(message);
  }

  async function login(event) {
    event.preventDefault();
    const token = $("#token").value.trim();
    if (!token) {
      showLogin("Paste an operator token.");
      return;
    }
    state.token = token;
    const button = $("#login-button");
    button.disabled = true;
    try {
      await get("/v1/sites"); // checks the token before anything is shown
      sessionStorage.setItem(TOKEN_KEY, token);
      $("#token").value = "";
      showApp();
    } catch (err) {
      if (err.status !== 401) logout(errorText(err)); // 401 already went back to login
    } finally {
      button.disabled = false;
    }
  }

  function showApp() {
    $("#login").hidden = true;
    $("#main").hidden = false;
    $("#nav").hidden = false;
    $("#logout").hidden = false;
    navigate();
  }

  // -- refresh loop ----------------------------------------------------------------------

  const ROUTES = [
    [/^$/, fleetView],
    [/^site\/([^/]+)$/, siteView],
    [/^site\/([^/]+)\/app\/([^/]+)$/, siteAppView],
    [/^site\/([^/]+)\/app\/([^/]+)\/instance\/([^/]+)$/, instanceView],
    [/^apps$/, appsView],
    [/^apps\/([^/]+)$/, appView],
  ];

  function navigate() {
    if (!state.token) return showLogin();
    state.gen++;
    clearTimeout(state.timer);
    const path = location.hash.replace(/^#\/?/, "").replace(/\/$/, "");
    const root = $("#view");
    root.replaceChildren();
    $("#banner").hidden = true;
    for (const [pattern, view] of ROUTES) {
      const m = pattern.exec(path);
      if (m) {
        let args;
        try {
          args = m.slice(1).map(decodeURIComponent);
        } catch {
          break;
        }
        state.update = view(root, ...args);
        return tick(state.gen);
      }
    }
    root.append(h("p", { class: "empty" }, "No such page. ", h("a", { href: "#/" }, "Back to the fleet")));
    state.update = null;
  }

  async function tick(gen) {
    if (gen !== state.gen || !state.token) return;
    const banner = $("#banner");
    const started = Date.now();
    try {
      await Promise.all([state.update ? state.update() : null, updateAlerts()]);
      if (gen !== state.gen) return;
      banner.hidden = true;
      $("#status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (gen !== state.gen || err.status === 401) return;
      banner.textContent = errorText(err);
      banner.hidden = false;
      $("#status").textContent = "refresh failed";
    }
    // A slow hub, or many apps (the apps view asks for each): wait longer, not pile up.
    const delay = Math.max(REFRESH_MS, 3 * (Date.now() - started));
    if (gen === state.gen && state.token) state.timer = setTimeout(() => tick(gen), delay);
  }

  // -- alerts (an optional route: hidden while the hub answers 404) --------------------------

  // Active alerts only; cleared ones (the hub keeps the last few hundred) go to a folded
  // history with their clear time, so the panel never contradicts the table below it.
  async function updateAlerts() {
    const panel = $("#alerts");
    let data;
    try {
      data = await get("/v1/alerts");
    } catch (err) {
      if (err.status === 404) {
        panel.hidden = true;
        return;
      }
      throw err;
    }
    const alerts = list(data.alerts).map(obj);
    const active = alerts.filter((a) => a.active !== false);
    const cleared = alerts.filter((a) => a.active === false).slice(0, ALERT_HISTORY);
    const rows = active.map((alert) => {
      const acked = alert.acknowledged === true;
      const button = acked
        ? h("span", { class: "muted" }, "acknowledged")
        : h("button", { type: "button", class: "ack", onclick: (e) => ack(alert.id, e.target) }, "Acknowledge");
      return h(
        "tr",
        { class: acked ? "acked" : "open", "data-alert": text(alert.id, "") },
        h("td", {}, text(alert.kind)),
        h("td", {}, alert.site ? h("a", { href: `#/site/${enc(alert.site)}` }, String(alert.site)) : "—"),
        h("td", {}, text(alert.message)),
        h("td", { title: clock(alert.since) }, age(alert.since)),
        h("td", {}, button),
      );
    });
    const history = cleared.map((alert) =>
      h(
        "tr",
        { "data-cleared": text(alert.id, "") },
        h("td", {}, text(alert.kind)),
        h("td", {}, alert.site ? h("a", { href: `#/site/${enc(alert.site)}` }, String(alert.site)) : "—"),
        h("td", {}, text(alert.message)),
        h("td", { title: clock(alert.since) }, clock(alert.since)),
        h("td", { title: clock(alert.cleared_at) }, age(alert.cleared_at)),
      ),
    );
    const historyBox = $("#alerts-history");
    const wasOpen = historyBox ? historyBox.open : false;
    const details = h(
      "details",
      { id: "alerts-history", open: wasOpen },
      h("summary", {}, `History: ${cleared.length} cleared`),
      table("alerts-cleared", ["Kind", "Site", "Message", "Fired", "Cleared"], history, "Nothing cleared recently."),
    );
    const activeTable = table("alerts-table", ["Kind", "Site", "Message", "Since", ""], rows, "No active alerts.");
    $("#alerts-body").replaceChildren(...(cleared.length ? [activeTable, details] : [activeTable]));
    $("#alerts-title").textContent = active.length ? `Alerts (${active.length} active)` : "Alerts";
    panel.hidden = false;
  }

  async function ack(id, button) {
    button.disabled = true;
    try {
      await api("POST", `/v1/alerts/${enc(text(id, ""))}/ack`);
      await updateAlerts();
    } catch (err) {
      button.disabled = false;
      if (err.status !== 401) button.after(h("span", { class: "error" }, ` ${errorText(err)}`));
    }
  }

  // -- health and trends ---------------------------------------------------------------

  // A site never heard from is waiting for its agents, not offline.
  function healthLabel(site) {
    return site.health === "unknown" && num(site.last_seen) === null ? "awaiting first report" : text(site.health, "unknown");
  }

  function healthBadge(site) {
    const v = text(site.health, "unknown").replace(/[^a-z0-9_-]/gi, "");
    return h("span", { class: `badge health-${v}` }, healthLabel(site));
  }

  const SVG = "http://www.w3.org/2000/svg"; // the SVG namespace: a name, never fetched

  function svg(tag, attrs) {
    const el = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
    return el;
  }

  // An inline SVG line of `values` at `times` (seconds), on 0..max(floor, highest value).
  // The x axis is time: the window ends at the newest sample, so a site with ten minutes of
  // samples fills the right sixth, and a silence longer than two periods is a gap.
  function sparkline(values, times, { width, height, floor, kind, title, windowS, everyS, calm }) {
    const top = Math.max(floor, ...values.filter((v) => v !== null));
    const end = times.length ? times[times.length - 1] : 0;
    const x = (t) => Math.max(0, width - (width * (end - t)) / windowS).toFixed(1);
    const y = (v) => (height - 1 - ((height - 2) * v) / (top || 1)).toFixed(1);
    const known = values.filter((v) => v !== null).length;
    const el = svg("svg", { class: `spark spark-${kind}${calm ? " calm" : ""}`, width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "data-points": known });
    const label = svg("title", {});
    label.textContent = title;
    el.append(label, svg("line", { class: "base", x1: 0, x2: width, y1: height - 0.5, y2: height - 0.5 }));
    let run = [];
    const flush = () => {
      if (run.length > 1) el.append(svg("polyline", { points: run.map(([px, py]) => `${px},${py}`).join(" ") }));
      else if (run.length === 1) el.append(svg("circle", { cx: run[0][0], cy: run[0][1], r: 1.5 }));
      run = [];
    };
    values.forEach((v, i) => {
      if (v === null || (i > 0 && times[i] - times[i - 1] > 2 * everyS)) flush();
      if (v !== null) run.push([x(times[i]), y(v)]);
    });
    flush();
    return el;
  }

  const TREND_KINDS = [
    ["cpu", "cpu_pct", "CPU (load per core)", "%", 100],
    ["memory", "memory_pct", "memory", "%", 100],
    ["disk", "disk_pct", "disk", "%", 100],
    ["restarts", "restarts", "restarts", "", 1],
  ];

  // What a trend says in words: the latest value, the peak, or for the restart counter the
  // restarts during the window.
  function trendFacts(samples, field, unit) {
    const values = samples.map((x) => num(obj(x)[field]));
    const times = samples.map((x) => num(obj(x).at) || 0);
    const known = values.filter((v) => v !== null);
    if (!known.length) return { values, times, now: "no data", peak: null, rise: 0 };
    if (field === "restarts") {
      let rise = 0;
      for (let i = 1; i < values.length; i++) if (values[i] !== null && values[i - 1] !== null && values[i] > values[i - 1]) rise += values[i] - values[i - 1];
      return { values, times, now: `+${rise}`, peak: known[known.length - 1], rise };
    }
    return { values, times, now: `${Math.round(known[known.length - 1])}${unit}`, peak: `${Math.round(Math.max(...known))}${unit}`, rise: 0 };
  }

  // The time axis of a site's trends; a restart line with no restart is drawn calm, not red.
  function trendAxis(data, f) {
    return { windowS: num(obj(data).window_s) || 3600, everyS: num(obj(data).every_s) || 30, calm: f.peak !== null && f.rise === 0 && f.now === "+0" };
  }

  function trendTitle(label, f, field) {
    if (f.peak === null) return `${label}: no data`;
    return field === "restarts" ? `${label}: ${f.now} in the window (total ${f.peak})` : `${label}: ${f.now} now, peak ${f.peak}`;
  }

  // The site's trends, fetched again only once a new sample can exist (every_s).
  async function trendsOf(siteId, force) {
    const cached = state.trends.get(siteId);
    const every = cached ? 1000 * (num(cached.data.every_s) || 30) : 0;
    if (cached && !force && Date.now() - cached.fetched < every) return cached.data;
    const data = await get(`/v1/sites/${enc(siteId)}/trends`);
    state.trends.set(siteId, { fetched: Date.now(), data });
    return data;
  }

  function trendCell(siteId) {
    const cached = state.trends.get(siteId);
    if (!cached) return "—";
    const samples = list(cached.data.samples);
    if (!samples.length) return h("span", { class: "muted", "data-trends": siteId }, "no reports yet");
    return h(
      "span",
      { class: "sparks", "data-trends": siteId },
      TREND_KINDS.map(([kind, field, label, unit, floor]) => {
        const f = trendFacts(samples, field, unit);
        return sparkline(f.values, f.times, { width: 56, height: 18, floor, kind, title: trendTitle(label, f, field), ...trendAxis(cached.data, f) });
      }),
    );
  }

  async function trendsPanel(box, siteId) {
    let data;
    try {
      data = await trendsOf(siteId, true);
    } catch (err) {
      if (err.status === 401) throw err;
      const why = err instanceof HubError && err.status === 403 ? "Trends need a fleet-wide token." : errorText(err);
      box.replaceChildren(h("p", { class: "muted", id: "trends-summary" }, why));
      return;
    }
    const samples = list(data.samples);
    const minutes = Math.round((num(data.window_s) || 3600) / 60);
    box.replaceChildren(
      h("p", { class: "muted", id: "trends-summary" }, samples.length ? `${samples.length} sample(s), one per ${text(data.every_s)} s at most, the last ${minutes} min; the busiest live host` : "No samples yet: the site has not reported."),
      h(
        "div",
        { class: "trends", id: "trends" },
        TREND_KINDS.map(([kind, field, label, unit, floor]) => {
          const f = trendFacts(samples, field, unit);
          return h(
            "div",
            { class: "trend", "data-kind": kind },
            h("div", { class: "trend-label" }, label),
            sparkline(f.values, f.times, { width: 220, height: 40, floor, kind, title: trendTitle(label, f, field), ...trendAxis(data, f) }),
            h("div", { class: "trend-value" }, field === "restarts" && f.peak !== null ? `${f.now} in ${minutes} min` : f.now, f.peak !== null && field !== "restarts" ? h("span", { class: "muted" }, ` · peak ${f.peak}`) : null),
          );
        }),
      ),
    );
  }

  // -- fleet -----------------------------------------------------------------------------

  // The list's counts (the site's latest report, or its gossip summary): [done, total] of
  // hosts up, apps healthy and instances ready; null where the hub does not know.
  function siteCounts(site) {
    const counts = obj(site.counts);
    const pair = (c, done) => {
      const total = num(obj(c).total);
      return total === null ? [null, null] : [num(obj(c)[done]), total];
    };
    return { hosts: pair(counts.hosts, "up"), apps: pair(counts.apps, "healthy"), instances: pair(counts.instances, "ready") };
  }

  // The agents' versions: the summary's list (several during an upgrade).
  function agentVersion(site) {
    const found = [...list(site.agent_versions), site.agent_version];
    const versions = [...new Set(found.filter((v) => typeof v === "string" && v && v !== "unknown"))];
    return versions.length ? versions.sort().join(", ") : null;
  }

  function ratio(a, b) {
    if (b === null || b === undefined) return "—";
    return h("span", { class: a !== null && a < b ? "bad" : "" }, `${text(a, "?")}/${b}`);
  }

  function fleetView(root) {
    const filter = h("input", { id: "filter", type: "search", placeholder: "filter: id, label=value, health…", "aria-label": "filter sites" });
    const groupBy = h("select", { id: "group-by", "aria-label": "group the map by label" });
    const summary = h("span", { id: "fleet-summary", class: "muted" });
    const map = h("div", { id: "map", class: "map" });
    const tableBox = h("div", { id: "sites-box" });
    root.append(
      h("section", { class: "panel" }, h("div", { class: "toolbar" }, h("h2", {}, "Map"), h("label", {}, "group by ", groupBy)), map),
      h("section", { class: "panel" }, h("div", { class: "toolbar" }, h("h2", {}, "Sites"), filter, summary), tableBox),
    );
    let rows = [];
    let chosenGroup = sessionStorage.getItem("meshorch.hub.groupBy");

    function matches(row, terms) {
      const hay = [row.site.id, row.site.health, row.agent || "", ...Object.entries(obj(row.site.labels)).map(([k, v]) => `${k}=${v}`)]
        .join(" ")
        .toLowerCase();
      return terms.every((t) => hay.includes(t));
    }

    function shownRows() {
      const terms = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      return rows.filter((r) => matches(r, terms));
    }

    function render() {
      const shown = shownRows();
      const byHealth = {};
      for (const r of rows) byHealth[healthLabel(r.site)] = (byHealth[healthLabel(r.site)] || 0) + 1;
      summary.textContent = `${shown.length} of ${rows.length} sites · ` + Object.entries(byHealth).map(([k, v]) => `${v} ${k}`).join(", ");
      tableBox.replaceChildren(
        table(
          "sites",
          ["Site", "Labels", "Health", "Hosts up", "Apps healthy", "Instances ready", "Last report", "Agent", "Applied", "Last hour: CPU, memory, disk, restarts"],
          shown.map((r) =>
            h(
              "tr",
              { "data-site": r.site.id, class: `health-row-${r.site.health}` },
              h("td", {}, h("a", { href: `#/site/${enc(r.site.id)}`, class: "site-link" }, r.site.id)),
              h("td", {}, labelChips(r.site.labels)),
              h("td", {}, healthBadge(r.site)),
              h("td", {}, ratio(...r.counts.hosts)),
              h("td", {}, ratio(...r.counts.apps)),
              h("td", {}, ratio(...r.counts.instances)),
              h("td", { title: clock(r.site.last_seen) }, age(r.site.last_seen), r.site.seen_via ? h("span", { class: "muted" }, ` via ${r.site.seen_via}`) : null),
              h("td", {}, text(r.agent)),
              h("td", {}, text(r.site.applied_version)),
              h("td", { class: "nowrap" }, trendCell(r.site.id)),
            ),
          ),
          rows.length ? "No site matches the filter." : "No sites registered yet.",
        ),
      );
      renderMap(shown);
    }

    function renderMap(shown) {
      const keys = [...new Set(rows.flatMap((r) => Object.keys(obj(r.site.labels))))].sort();
      if (chosenGroup === null || (chosenGroup !== "" && !keys.includes(chosenGroup) && rows.length)) {
        chosenGroup = keys.includes("region") ? "region" : keys[0] || "";
      }
      const options = [h("option", { value: "" }, "(nothing)"), ...keys.map((k) => h("option", { value: k }, k))];
      groupBy.replaceChildren(...options);
      groupBy.value = chosenGroup;
      const groups = new Map();
      for (const r of shown) {
        const value = chosenGroup ? obj(r.site.labels)[chosenGroup] : "all sites";
        const name = value === undefined ? `no ${chosenGroup}` : String(value);
        if (!groups.has(name)) groups.set(name, []);
        groups.get(name).push(r);
      }
      map.replaceChildren(
        ...[...groups.entries()]
          .sort(([a], [b]) => a.localeCompare(b))
          .map(([name, members]) =>
            h(
              "div",
              { class: "group", "data-group": name },
              h("h3", {}, chosenGroup ? `${chosenGroup}=${name}` : name, h("span", { class: "muted" }, ` (${members.length})`)),
              h(
                "div",
                { class: "tiles" },
                members.map((r) =>
                  h("a", { class: `tile health-${r.site.health}`, href: `#/site/${enc(r.site.id)}`, title: `${r.site.id}: ${healthLabel(r.site)}`, "data-site": r.site.id }, r.site.id),
                ),
              ),
            ),
          ),
      );
      if (!shown.length) map.append(h("p", { class: "empty" }, "No sites to show."));
    }

    filter.addEventListener("input", render);
    groupBy.addEventListener("change", () => {
      chosenGroup = groupBy.value;
      sessionStorage.setItem("meshorch.hub.groupBy", chosenGroup);
      render();
    });

    return async () => {
      // One request a page: the list carries each site's counts (a site's detail is fetched only
      // when the operator opens it).
      const sites = (await getAll("/v1/sites", "sites")).map(obj).filter((s) => typeof s.id === "string");
      rows = sites.map((site) => {
        site.health = typeof site.health === "string" ? site.health : "unknown";
        return { site, counts: siteCounts(site), agent: agentVersion(site) };
      });
      rows.sort((a, b) => (HEALTH_RANK[a.site.health] ?? 1.5) - (HEALTH_RANK[b.site.health] ?? 1.5) || a.site.id.localeCompare(b.site.id));
      render();
      // Sparklines for the first rows (a bounded number of requests, each at most once per
      // sample period); a tenant token is refused trends once and not asked again.
      if (state.trendsRefused) return;
      try {
        await mapLimit(shownRows().slice(0, TREND_ROWS), DETAIL_PARALLEL, (r) =>
          trendsOf(r.site.id, false).catch((err) => {
            if (err.status === 401 || err.status === 403) throw err;
            return null; // a site deleted meanwhile, a hiccup: its cell waits for the next refresh
          }),
        );
      } catch (err) {
        if (!(err instanceof HubError) || err.status !== 403) throw err;
        state.trendsRefused = true;
      }
      render();
    };
  }

  // -- a site ----------------------------------------------------------------------------

  function crumbs(...parts) {
    const out = [h("a", { href: "#/" }, "Fleet")];
    for (const [label, href] of parts) out.push(" › ", href ? h("a", { href }, label) : h("span", {}, label));
    return h("nav", { class: "crumbs" }, out);
  }

  function logTable(id, logs, empty) {
    return table(
      id,
      ["Time", "Level", "Host", "Stream", "Line"],
      list(logs).map((raw) => {
        const l = obj(raw);
        const level = num(l.level);
        return h(
          "tr",
          { class: `log-line level-${level === null ? "none" : level}` },
          h("td", { class: "nowrap" }, clock(l.time)),
          h("td", {}, level === null ? "—" : LEVELS[level] || String(level)),
          h("td", {}, text(l.host)),
          h("td", { class: "muted" }, text(l.stream)),
          h("td", { class: "log-text" }, text(l.text, "")),
        );
      }),
      empty,
    );
  }

  // Logs are optional on every page: a refused or failed query shows in place.
  async function logsSection(box, query, empty) {
    try {
      const page = await get(`/v1/logs?${new URLSearchParams(query)}`);
      box.replaceChildren(logTable("logs", page.logs, empty));
    } catch (err) {
      if (err.status === 401) throw err;
      box.replaceChildren(h("p", { class: "error" }, `logs: ${errorText(err)}`));
    }
  }

  function instanceRows(siteId, d, onlyApp) {
    const rows = [];
    for (const rawHost of list(d.hosts)) {
      const host = obj(rawHost);
      for (const raw of list(host.instances)) {
        const i = obj(raw);
        if (onlyApp !== undefined && i.app !== onlyApp) continue;
        const app = text(i.app, "");
        const iid = text(i.instance_id, "");
        rows.push(
          h(
            "tr",
            { "data-instance": iid },
            h("td", {}, text(host.host_id)),
            h("td", {}, app ? h("a", { href: `#/site/${enc(siteId)}/app/${enc(app)}`, class: "app-link" }, app) : "—"),
            h("td", {}, iid && app ? h("a", { href: `#/site/${enc(siteId)}/app/${enc(app)}/instance/${enc(iid)}`, class: "instance-link" }, iid) : text(iid)),
            h("td", {}, text(i.service)),
            h("td", {}, text(i.version)),
            h("td", {}, badge(i.state, "state")),
            h("td", {}, i.ready === true ? "yes" : h("span", { class: "bad" }, "no")),
            h("td", { class: num(i.restarts) ? "bad" : "" }, text(i.restarts, "0")),
          ),
        );
      }
    }
    return rows;
  }

  const INSTANCE_HEADERS = ["Host", "App", "Instance", "Service", "Version", "State", "Ready", "Restarts"];

  function siteHeader(d) {
    return h(
      "div",
      { class: "facts" },
      h("h2", {}, text(d.id), " ", healthBadge(d)),
      h("div", {}, labelChips(d.labels)),
      h(
        "dl",
        {},
        h("dt", {}, "last report"), h("dd", {}, age(d.last_seen), d.seen_via ? ` via ${d.seen_via}` : ""),
        h("dt", {}, "applied delta"), h("dd", {}, text(d.applied_version)),
        h("dt", {}, "enrolled"), h("dd", {}, d.enrolled === true ? "yes" : "no"),
      ),
    );
  }

  // What the site will do when it next applies the deltas it has not applied (GET
  // /v1/sites/{id}/pending: fleet-wide tokens only).
  function pendingRows(p) {
    const caused = (versions) => list(versions).join(", ");
    const rows = [];
    const add = (kind, what, change, versions) => rows.push(h("tr", {}, h("td", {}, kind), h("td", {}, what), h("td", {}, change), h("td", {}, caused(versions))));
    for (const a of list(p.apps).map(obj)) {
      const change = { added: `added, version ${text(a.to)}`, removed: `removed (was ${text(a.from)})`, upgraded: `upgraded ${text(a.from)} → ${text(a.to)}` }[a.change] || text(a.change);
      add("app", `${text(a.app)}${typeof a.tenant === "string" ? ` (${a.tenant})` : ""}`, change, a.versions);
    }
    for (const x of list(p.secrets).map(obj)) {
      add("secret", text(x.secret), x.change === "rotated" ? `rotated, version ${text(x.from)} → ${text(x.to)}` : text(x.change), x.versions);
    }
    if (list(p.key_rotations).length) add("data keys", "", "rotated", p.key_rotations);
    const lockdown = obj(p.lockdown);
    if (p.lockdown) add("lock-down", "", text(lockdown.change), lockdown.versions);
    const upgrade = obj(p.agent_upgrade);
    if (p.agent_upgrade) add("agent", list(upgrade.from).join(", ") || "—", `upgrade to ${text(upgrade.to)}`, upgrade.versions);
    for (const q of list(p.quotas).map(obj)) {
      add("quota", text(q.tenant), Object.entries(obj(q.to)).map(([k, v]) => `${k}=${text(v)}`).join(", ") || "unlimited", q.versions);
    }
    if (list(p.decommission).length) add("site", "", "DECOMMISSION: stops every application, wipes its secrets", p.decommission);
    if (list(p.root_rotations).length) add("fleet", "", "root key rotated", p.root_rotations);
    for (const o of list(p.other_ops).map(obj)) add("other", text(o.op), "not known to this page", [o.version]);
    return rows;
  }

  async function pendingSection(box, siteId) {
    let p;
    try {
      p = await get(`/v1/sites/${enc(siteId)}/pending`);
    } catch (err) {
      const why = err instanceof HubError && err.status === 403 ? "Pending changes need a fleet-wide token." : errorText(err);
      box.replaceChildren(h("p", { class: "muted", id: "pending-summary" }, why));
      return;
    }
    const reported = num(p.report_age_s) === null ? "no report yet" : `as of its report of ${Math.round(p.report_age_s)} s ago`;
    const summary = `applied ${text(p.applied_version)} of ${text(p.head)}: ${text(p.deltas_pending)} delta(s) pending, ${text(p.deltas_for_site)} for this site; ${reported}`;
    const notes = [];
    if (p.snapshot_first) notes.push(" The site is behind the hub's compaction: it catches up by a snapshot first, whose changes are not listed.");
    if (p.complete === false) notes.push(` Only the deltas through ${text(p.scanned_through)} were read.`);
    const held = obj(p.held);
    if (p.held) notes.push(` HELD since ${clock(held.since)}: none of this happens before the site is released (meshorch site release).`);
    box.replaceChildren(
      h("p", { id: "pending-summary" }, summary, p.stale ? " " : "", p.stale ? badge("stale", "reason") : "", notes),
      table("pending", ["Kind", "What", "Change", "Deltas"], pendingRows(p), "Nothing changes at this site."),
    );
  }

  function siteView(root, siteId) {
    const head = h("div", { class: "panel" });
    const hosts = h("div", {});
    const apps = h("div", {});
    const rejections = h("div", {});
    const events = h("div", {});
    const pending = h("div", {});
    const trends = h("div", {});
    root.append(
      crumbs([siteId]),
      head,
      h("section", { class: "panel" }, h("h2", {}, "Trends (last hour)"), trends),
      h("section", { class: "panel" }, h("h2", {}, "Hosts and instances"), hosts),
      h("section", { class: "panel" }, h("h2", {}, "Applications"), apps),
      h("section", { class: "panel" }, h("h2", {}, "Pending changes"), pending),
      h("section", { class: "panel" }, h("h2", {}, "Recent rejections"), rejections),
      h("section", { class: "panel" }, h("h2", {}, "Recent events"), events),
    );
    return async () => {
      const d = await get(`/v1/sites/${enc(siteId)}`);
      head.replaceChildren(siteHeader(d));
      const hostList = list(d.hosts).map(obj);
      hosts.replaceChildren(
        h("p", { class: "muted", id: "host-summary" }, hostList.map((x) => `${text(x.host_id)}: ${x.alive === true ? "alive" : "down"}${typeof x.agent_version === "string" ? ` (agent ${x.agent_version})` : ""}`).join(" · ") || "No hosts in the latest report."),
        table("instances", INSTANCE_HEADERS, instanceRows(siteId, d), "No instances."),
      );
      apps.replaceChildren(
        table(
          "site-apps",
          ["App", "Version", "Ready", "State", "Message", ""],
          Object.entries(obj(d.apps))
            .sort(([a], [b]) => a.localeCompare(b))
            .map(([name, raw]) => {
              const a = obj(raw);
              return h(
                "tr",
                { "data-app": name },
                h("td", {}, h("a", { href: `#/site/${enc(siteId)}/app/${enc(name)}`, class: "app-link" }, name)),
                h("td", {}, text(a.version)),
                h("td", {}, ratio(num(a.ready), num(a.desired))),
                h("td", {}, badge(a.state, "state")),
                h("td", {}, text(a.message, "")),
                h("td", {}, h("a", { href: `#/apps/${enc(name)}` }, "rollout")),
              );
            }),
          "No applications in the latest report.",
        ),
      );
      rejections.replaceChildren(
        table(
          "rejections",
          ["When", "Reason", "Delta", "Message"],
          list(d.rejections)
            .map(obj)
            .sort((a, b) => (num(b.at) || 0) - (num(a.at) || 0))
            .map((r) => h("tr", {}, h("td", { title: clock(r.at) }, age(r.at)), h("td", {}, badge(r.reason, "reason")), h("td", {}, text(r.version)), h("td", {}, text(r.message, "")))),
          "No rejected deltas in the latest report.",
        ),
      );
      await trendsPanel(trends, siteId);
      await pendingSection(pending, siteId);
      await logsSection(events, { site: siteId, limit: "20" }, "No events from this site at the hub.");
    };
  }

  function siteAppView(root, siteId, app) {
    const status = h("div", { class: "panel" });
    const instances = h("div", {});
    const logs = h("div", {});
    root.append(
      crumbs([siteId, `#/site/${enc(siteId)}`], [app]),
      status,
      h("section", { class: "panel" }, h("h2", {}, "Instances"), instances),
      h("section", { class: "panel" }, h("h2", {}, `Recent logs of ${app} at ${siteId}`), logs),
    );
    return async () => {
      const d = await get(`/v1/sites/${enc(siteId)}`);
      const a = obj(obj(d.apps)[app]);
      status.replaceChildren(
        h("h2", {}, app, " ", badge(a.state || "unknown", "state")),
        h(
          "dl",
          {},
          h("dt", {}, "version"), h("dd", {}, text(a.version)),
          h("dt", {}, "ready"), h("dd", {}, ratio(num(a.ready), num(a.desired))),
          h("dt", {}, "message"), h("dd", {}, text(a.message)),
          h("dt", {}, "rollout"), h("dd", {}, h("a", { href: `#/apps/${enc(app)}` }, "fleet-wide progress")),
        ),
      );
      instances.replaceChildren(table("instances", INSTANCE_HEADERS, instanceRows(siteId, d, app), "No instances of this application in the latest report."));
      await logsSection(logs, { site: siteId, app, limit: String(LOG_LIMIT) }, "No log lines of this application at the hub.");
    };
  }

  function instanceView(root, siteId, app, instanceId) {
    const facts = h("div", { class: "panel" });
    const logs = h("div", {});
    const title = h("h2", {}, "Recent logs");
    root.append(
      crumbs([siteId, `#/site/${enc(siteId)}`], [app, `#/site/${enc(siteId)}/app/${enc(app)}`], [instanceId]),
      facts,
      h("section", { class: "panel" }, title, logs),
    );
    return async () => {
      const d = await get(`/v1/sites/${enc(siteId)}`);
      let found = null;
      for (const rawHost of list(d.hosts)) {
        for (const raw of list(obj(rawHost).instances)) {
          if (obj(raw).instance_id === instanceId) found = { host: obj(rawHost), i: obj(raw) };
        }
      }
      if (!found) {
        facts.replaceChildren(h("p", { class: "empty" }, `Instance ${instanceId} is not in the site's latest report.`));
        title.textContent = `Recent logs of ${app} at ${siteId}`;
        await logsSection(logs, { site: siteId, app, limit: String(LOG_LIMIT) }, "No log lines at the hub.");
        return;
      }
      const { host, i } = found;
      facts.replaceChildren(
        h("h2", {}, instanceId, " ", badge(i.state, "state")),
        h(
          "dl",
          { id: "instance-facts" },
          h("dt", {}, "host"), h("dd", {}, `${text(host.host_id)} (${host.alive === true ? "alive" : "down"})`),
          h("dt", {}, "service"), h("dd", {}, text(i.service)),
          h("dt", {}, "version"), h("dd", {}, text(i.version)),
          h("dt", {}, "ready"), h("dd", {}, i.ready === true ? "yes" : "no"),
          h("dt", {}, "restarts"), h("dd", {}, text(i.restarts, "0")),
        ),
      );
      // Lines carry the host, not the instance: the host's lines of the app are the closest.
      title.textContent = `Recent logs of ${app} on ${text(host.host_id)} at ${siteId}`;
      const query = { site: siteId, app, limit: String(LOG_LIMIT) };
      if (typeof host.host_id === "string" && host.host_id) query.host = host.host_id;
      await logsSection(logs, query, "No log lines of this application on this host at the hub.");
    };
  }

  // -- rollouts --------------------------------------------------------------------------

  function progressOf(dep) {
    const d = obj(dep);
    const sites = list(d.waves).flat();
    const progress = obj(d.progress);
    const healthy = sites.filter((s) => obj(progress[s]).state === "healthy").length;
    return { healthy, total: sites.length, failed: sites.filter((s) => obj(progress[s]).state === "failed").length };
  }

  function progressBar(p) {
    const pct = p.total ? Math.round((100 * p.healthy) / p.total) : 100;
    const bar = h("span", { class: "fill" });
    bar.style.width = `${pct}%`; // CSSOM, allowed by the page's style policy
    return h("span", { class: "progress", title: `${p.healthy} of ${p.total} sites healthy` }, h("span", { class: "bar" }, bar), ` ${p.healthy}/${p.total}`, p.failed ? h("span", { class: "bad" }, ` (${p.failed} failed)`) : null);
  }

  // A small bar per wave, in order: how far the rollout got, at a glance.
  function waveBars(dep) {
    const d = obj(dep);
    const progress = obj(d.progress);
    const waves = list(d.waves);
    const overall = progressOf(d);
    return h(
      "span",
      { class: "waves", title: `${overall.healthy} of ${overall.total} sites healthy in ${waves.length} wave(s)` },
      waves.map((wave, n) => {
        const p = progressOf({ waves: [wave], progress });
        const bar = h("span", { class: `fill${p.failed ? " failed" : ""}` });
        bar.style.width = `${p.total ? Math.round((100 * (p.failed ? p.total : p.healthy)) / p.total) : 100}%`;
        return h("span", { class: "wave-bar", "data-wave": n + 1, title: `wave ${n + 1}: ${p.healthy}/${p.total} healthy${p.failed ? `, ${p.failed} failed` : ""}` }, bar);
      }),
      ` ${overall.healthy}/${overall.total}`,
      overall.failed ? h("span", { class: "bad" }, ` (${overall.failed} failed)`) : null,
    );
  }

  function appsView(root) {
    const box = h("div", {});
    root.append(h("section", { class: "panel" }, h("h2", {}, "Applications and rollouts"), box));
    return async () => {
      const apps = (await getAll("/v1/apps", "apps")).map(obj).filter((a) => typeof a.name === "string");
      const details = await mapLimit(apps, DETAIL_PARALLEL, (a) =>
        get(`/v1/apps/${enc(a.name)}`).catch((err) => {
          if (err.status === 401) throw err;
          return null;
        }),
      );
      box.replaceChildren(
        table(
          "apps",
          ["App", "Tenant", "Version", "Deployment", "State", "Progress", "Sites"],
          apps.map((a, i) => {
            const dep = obj(obj(details[i]).deployment);
            return h(
              "tr",
              { "data-app": a.name },
              h("td", {}, h("a", { href: `#/apps/${enc(a.name)}`, class: "app-link" }, a.name)),
              h("td", {}, text(a.tenant)),
              h("td", {}, text(a.version)),
              h("td", {}, text(obj(a.deployment).id)),
              h("td", {}, badge(obj(a.deployment).state || "none", "state")),
              h("td", {}, details[i] ? waveBars(dep) : "—"),
              h("td", {}, String(list(a.sites).length)),
            );
          }),
          "No applications deployed.",
        ),
      );
    };
  }

  function appView(root, name) {
    const head = h("div", { class: "panel" });
    const waves = h("div", {});
    const sites = h("div", {});
    root.append(
      h("nav", { class: "crumbs" }, h("a", { href: "#/apps" }, "Rollouts"), " › ", name),
      head,
      h("section", { class: "panel" }, h("h2", {}, "Waves of the current deployment"), waves),
      h("section", { class: "panel" }, h("h2", {}, "Status per site"), sites),
    );
    return async () => {
      const a = await get(`/v1/apps/${enc(name)}`);
      const dep = obj(a.deployment);
      const progress = obj(dep.progress);
      head.replaceChildren(
        h("h2", {}, name, " ", text(a.version, ""), " ", badge(dep.state || "none", "state")),
        h(
          "dl",
          {},
          h("dt", {}, "tenant"), h("dd", {}, text(a.tenant)),
          h("dt", {}, "deployment"), h("dd", {}, text(dep.id)),
          h("dt", {}, "progress"), h("dd", {}, a.deployment ? progressBar(progressOf(dep)) : "—"),
          h("dt", {}, "reason"), h("dd", {}, text(dep.reason)),
          h("dt", {}, "placement"), h("dd", { class: "mono" }, JSON.stringify(obj(a.placement))),
        ),
      );
      waves.replaceChildren(
        table(
          "waves",
          ["Wave", "Progress", "Sites"],
          list(dep.waves).map((wave, n) =>
            h(
              "tr",
              { class: n === dep.wave && dep.state === "running" ? "current" : "", "data-wave": n + 1 },
              h("td", {}, `${n + 1}${n === dep.wave && dep.state === "running" ? " (current)" : ""}`),
              h("td", {}, progressBar(progressOf({ waves: [wave], progress }))),
              h("td", {}, list(wave).map((s) => {
                const st = text(obj(progress[s]).state, "pending");
                return h("a", { href: `#/site/${enc(s)}`, class: `wave-site badge state-${st.replace(/[^a-z]/g, "")}` }, `${s}: ${st}`);
              })),
            ),
          ),
          "No deployment.",
        ),
      );
      sites.replaceChildren(
        table(
          "app-sites",
          ["Site", "Version", "State", "Message"],
          Object.entries(obj(a.sites)).map(([site, raw]) => {
            const s = raw && typeof raw === "object" ? raw : null;
            return h(
              "tr",
              { "data-site": site },
              h("td", {}, h("a", { href: `#/site/${enc(site)}/app/${enc(name)}` }, site)),
              h("td", {}, s ? text(s.version) : "—"),
              h("td", {}, badge(s ? s.state : "not reported", "state")),
              h("td", {}, s ? text(s.message, "") : ""),
            );
          }),
          "No site has this application.",
        ),
      );
    };
  }

  // -- start -----------------------------------------------------------------------------

  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", () => logout("Logged out."));
  window.addEventListener("hashchange", () => state.token && navigate());
  if (state.token) showApp();
  else showLogin();
})();
