// seckill ops console: plain JavaScript, no build step, no library, nothing from a CDN.
//
// The admin token lives in the `token` variable of this closure and nowhere else: not in
// browser storage, not in a cookie, not in a URL. Every call, the live stream included, sends it
// as `Authorization: Bearer …` to the admin API, exactly as curl would. The stream is read
// with fetch() because EventSource cannot send that header.
"use strict";
(() => {
  let token = null;
  let streamAbort = null;
  let lastSnapshotAt = 0;
  let latest = null;
  const history = [];            // [{t, total, byOutcome}] for the chart, newest last
  const HISTORY = 120;           // seconds on the chart
  const POLL_QUEUE_MS = 5000;
  const POLL_RISK_MS = 3000;
  const POLL_ABSENT_MS = 30000;  // an endpoint this gateway does not have: ask again rarely
  const timers = [];
  const timeouts = [];
  const colors = {};
  const FIXED = { ok: "#15803d", sold_out: "#6b7280", degraded: "#b45309",
    overloaded: "#b91c1c", rate_limited: "#7c3aed" };
  const palette = ["#0891b2", "#db2777", "#65a30d", "#ea580c", "#475569", "#a16207",
    "#4f46e5", "#be123c"];

  const $ = (selector, root = document) => root.querySelector(selector);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  function show(node, visible) { node.hidden = !visible; }

  function setMessage(node, text, ok) {
    node.textContent = text;
    node.className = "message " + (ok ? "ok" : "error");
  }

  function fmt(n) {
    if (n === null || n === undefined) return "–";
    return typeof n === "number" ? n.toLocaleString("en-US") : String(n);
  }

  // -- the admin API -----------------------------------------------------------------------

  async function api(method, path, body) {
    const init = { method, headers: { Authorization: "Bearer " + token }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401 && token !== null) signOut("The admin token was refused (401).");
    return { status: response.status, data };
  }

  // the contract's error body, shown as the API wrote it
  function apiError(answer) {
    const error = answer.data && answer.data.error;
    return error ? `${answer.status} ${error.code}: ${error.message}` : `HTTP ${answer.status}`;
  }

  // -- sign in / out -----------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const input = $("#token");
    const candidate = input.value.trim();
    input.value = "";  // not even the form field keeps it
    const error = $("#signin-error");
    error.textContent = "";
    if (!candidate) return;
    token = candidate;
    let answer;
    try {
      answer = await api("GET", "/admin/v1/flags");
    } catch (e) {
      token = null;
      error.textContent = "The gateway did not answer: " + e.message;
      return;
    }
    if (answer.status !== 200) {
      token = null;
      error.textContent = answer.status === 401
        ? "Token refused: 401 unauthorized."
        : "Sign-in failed: " + apiError(answer);
      return;
    }
    show($("#signin"), false);
    show($("#console"), true);
    show($("#signout"), true);
    renderFlags(answer.data.flags, {});
    startStream();
    loadActivityList();
    repeat(pollQueue);
    repeat(pollRisk);
    timers.push(setInterval(watchdog, 1000));
  }

  function signOut(reason) {
    token = null;
    if (streamAbort) streamAbort.abort();
    streamAbort = null;
    while (timers.length) clearInterval(timers.pop());
    while (timeouts.length) clearTimeout(timeouts.pop());
    show($("#console"), false);
    show($("#signout"), false);
    show($("#signin"), true);
    setStatus("off", "signed out");
    $("#signin-error").textContent = reason || "";
    $("#token").focus();
  }

  // -- the live stream ---------------------------------------------------------------------

  function setStatus(kind, text) {
    const status = $("#status");
    status.className = "status " + kind;
    status.textContent = text;
  }

  async function startStream() {
    while (token !== null) {
      const controller = new AbortController();
      streamAbort = controller;
      try {
        const response = await fetch("/admin/v1/live", {
          headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" },
          cache: "no-store",
          signal: controller.signal,
        });
        if (response.status === 401) { signOut("The admin token was refused (401)."); return; }
        if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
        setStatus("live", "live");
        await readEvents(response.body.getReader());
      } catch (e) {
        if (controller.signal.aborted || token === null) return;
      }
      if (token === null) return;
      setStatus("lost", "reconnecting");
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  async function readEvents(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = message.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart()).join("\n");
        if (data) render(JSON.parse(data));
      }
    }
  }

  function watchdog() {
    const banner = $("#banner-stream");
    const silent = lastSnapshotAt && Date.now() - lastSnapshotAt > 4000;
    if (silent) banner.textContent = "No snapshot for " +
      Math.round((Date.now() - lastSnapshotAt) / 1000) + " s: the gateway is unreachable or stalled.";
    show(banner, Boolean(silent));
    if (silent) setStatus("lost", "stalled");
  }

  // -- rendering a snapshot ----------------------------------------------------------------

  function render(snap) {
    lastSnapshotAt = Date.now();
    const stream = $("#banner-stream");
    stream.textContent = snap.error
      ? `The gateway could not take a snapshot (${snap.error}): see its log.` : "";
    show(stream, Boolean(snap.error));
    if (snap.error) return;  // keep the last good figures on screen
    latest = snap;
    renderBanners(snap);
    renderTraffic(snap.requests || { per_second: 0, by_outcome: {}, by_endpoint: {} });
    if (snap.activities) renderActivities(snap);
    markStale(!(snap.redis && snap.redis.up));
    renderHealth(snap);
    if (snap.flags) renderFlags(snap.flags, snap.flag_expiries || {});
    if (snap.audit) renderAudit(snap.audit);
  }

  function renderBanners(snap) {
    const redisDown = snap.redis && !snap.redis.up;
    $("#banner-redis").textContent = redisDown
      ? `Redis down: ${snap.redis.error}. Nothing is sold: order POST answers 503 overloaded.`
      : "";
    show($("#banner-redis"), Boolean(redisDown));

    const open = (snap.breakers || []).filter((b) => b.state !== "closed");
    $("#banner-breaker").textContent = open.length
      ? "Breaker " + open.map((b) => `${b.name} ${b.state}`).join(", ") +
        (open.some((b) => b.name === "redis") ? ": order POST answers 503 overloaded." : ".")
      : "";
    show($("#banner-breaker"), open.length > 0);

    const degraded = snap.sale && !snap.sale.enabled;
    const paused = Object.entries(snap.flags || {})
      .filter(([name, value]) => /^activity\..+\.paused$/.test(name) && value === true)
      .map(([name]) => name.split(".").slice(1, -1).join("."));
    let text = "";
    if (degraded) {
      const until = (snap.flag_expiries || {})["seckill.enabled"];
      text = "Sale degraded: seckill.enabled is off, every order POST answers 503 degraded" +
        (until ? ` (back at ${until})` : "") + ".";
    }
    if (paused.length) text += (text ? " " : "") + "Paused: " + paused.join(", ") + ".";
    $("#banner-degraded").textContent = text;
    show($("#banner-degraded"), Boolean(text));

    const writerDown = snap.redis && snap.redis.up &&
      (snap.writer_alive === false || snap.sweeper_alive === false);
    $("#banner-writer").textContent = writerDown
      ? "Order writer or sweeper not running: accepted orders wait unwritten." : "";
    show($("#banner-writer"), Boolean(writerDown));
  }

  function colorOf(outcome) {
    if (FIXED[outcome]) return FIXED[outcome];
    if (!colors[outcome]) colors[outcome] = palette[Object.keys(colors).length % palette.length];
    return colors[outcome];
  }

  function renderTraffic(requests) {
    $("#rps").textContent = fmt(requests.per_second);
    history.push({ total: requests.per_second, byOutcome: requests.by_outcome });
    while (history.length > HISTORY) history.shift();
    drawChart();
    const body = $("#outcomes tbody");
    body.replaceChildren();
    for (const [endpoint, outcomes] of Object.entries(requests.by_endpoint)) {
      for (const [outcome, rate] of Object.entries(outcomes)) {
        body.append(el("tr", { "data-endpoint": endpoint, "data-outcome": outcome },
          el("td", {}, endpoint), el("td", {}, outcome), el("td", { class: "num" }, fmt(rate))));
      }
    }
  }

  function drawChart() {
    const canvas = $("#chart");
    const width = canvas.clientWidth || canvas.width;
    if (canvas.width !== width) canvas.width = width;
    const height = canvas.height;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const top = Math.max(1, ...history.map((h) => h.total));
    const x = (i) => width - (history.length - 1 - i) * (width / (HISTORY - 1));
    const y = (v) => height - 4 - (v / top) * (height - 20);
    ctx.fillStyle = "#6b7280";
    ctx.font = "11px system-ui";
    ctx.fillText(fmt(Math.round(top)) + "/s", 4, 12);
    const outcomes = new Set();
    history.forEach((h) => Object.keys(h.byOutcome || {}).forEach((o) => outcomes.add(o)));
    const series = [["total", "#1d4ed8", (h) => h.total]];
    for (const outcome of [...outcomes].sort()) {
      series.push([outcome, colorOf(outcome), (h) => (h.byOutcome || {})[outcome] || 0]);
    }
    for (const [, color, value] of series) {
      ctx.strokeStyle = color;
      ctx.lineWidth = color === "#1d4ed8" ? 2 : 1.5;
      ctx.beginPath();
      history.forEach((h, i) => (i ? ctx.lineTo(x(i), y(value(h))) : ctx.moveTo(x(i), y(value(h)))));
      ctx.stroke();
    }
    const legend = $("#legend");
    legend.replaceChildren(...series.map(([name, color]) => {
      const swatch = el("i");
      swatch.style.background = color;  // CSSOM, which the page's CSP allows
      return el("span", {}, swatch, name);
    }));
  }

  function activityRow(id) {
    let row = $(`#activities tbody tr[data-activity="${CSS.escape(id)}"]`);
    if (row) return row;
    const cells = ["name", "state", "available", "reserved", "paid", "released", "created",
      "pending", "lag", "consistent"];
    row = el("tr", { "data-activity": id });
    for (const cell of cells) {
      const numeric = !["name", "state", "consistent"].includes(cell);
      row.append(el("td", { class: cell + (numeric ? " num" : "") }));
    }
    const edit = el("button", { type: "button", class: "edit", textContent: "Edit" });
    edit.addEventListener("click", () => loadActivity(id));
    const pause = el("button", { type: "button", class: "pause", textContent: "Pause" });
    pause.addEventListener("click", () =>
      setFlag(`activity.${id}.paused`, pause.dataset.paused !== "true", ""));
    row.append(el("td", { class: "actions" }, edit, " ", pause));
    $("#activities tbody").append(row);
    return row;
  }

  function renderActivities(snap) {
    $("#activity-count").textContent = snap.activities_total > snap.activities.length
      ? `(${snap.activities.length} of ${snap.activities_total})` : "";
    const seen = new Set();
    for (const a of snap.activities) {
      seen.add(a.id);
      const row = activityRow(a.id);
      const r = a.report || {};
      const set = (cls, text) => { $("." + cls, row).textContent = text; };
      set("name", `${a.id} · ${a.title}`);
      const pause = $("button.pause", row);
      pause.dataset.paused = String(Boolean(a.paused));
      pause.textContent = a.paused ? "Resume" : "Pause";
      const state = $(".state", row);
      state.textContent = a.state;
      state.className = "state state-" + a.state;
      set("available", fmt(r.available));
      set("reserved", fmt(r.reserved));
      set("paid", fmt(r.paid));
      set("released", fmt(r.released));
      set("created", fmt(r.orders_created));
      set("pending", fmt(r.orders_pending_write));
      set("lag", a.writer_lag_s ? a.writer_lag_s + " s" : "0 s");
      const consistent = $(".consistent", row);
      consistent.replaceChildren();
      if (a.report) {
        consistent.append(el("span", { class: r.consistent ? "yes" : "no",
          textContent: r.consistent ? "yes" : "no" }));
        for (const problem of r.problems || []) {
          consistent.append(el("div", { class: "problems", textContent: problem }));
        }
      } else {
        consistent.append(el("span", { class: "no", textContent: a.error || "no report" }));
      }
    }
    $("#activities tbody").querySelectorAll("tr").forEach((row) => {
      if (!seen.has(row.dataset.activity)) row.remove();
    });
  }

  function markStale(stale) {
    $("#activities tbody").querySelectorAll("tr").forEach((row) => {
      row.classList.toggle("stale", stale);
    });
  }

  function renderHealth(snap) {
    const redis = $("#health-redis");
    const up = snap.redis && snap.redis.up;
    redis.textContent = up ? "up" : "down";
    redis.className = up ? "yes" : "no";
    for (const loop of ["writer", "sweeper"]) {
      const node = $("#health-" + loop);
      const alive = snap[loop + "_alive"];
      node.textContent = alive === undefined ? "unknown" : alive ? "alive" : "not running";
      node.className = alive ? "yes" : "no";
    }
    const gateway = snap.gateway || {};
    $("#health-inflight").textContent = fmt(gateway.in_flight) +
      (gateway.shed ? ` (shed ${fmt(gateway.shed)})` : "");
    $("#health-lag").textContent = gateway.loop_lag_ms === undefined ? "–" : gateway.loop_lag_ms + " ms";
    $("#health-at").textContent = snap.at + (gateway.pid ? ` · pid ${gateway.pid}` : "");
    const list = $("#breakers");
    list.replaceChildren(...(snap.breakers || []).map((b) =>
      el("li", { "data-breaker": b.name },
        el("span", { textContent: b.name + " " }),
        el("span", { class: "breaker-state " + b.state, textContent: b.state }))));
  }

  // -- flags ---------------------------------------------------------------------------------

  function flagRow(name) {
    let row = $(`#flags tbody tr[data-flag="${CSS.escape(name)}"]`);
    if (row) return row;
    const ttl = el("input", { type: "number", min: 1, class: "ttl", placeholder: "none" });
    const controls = el("td", { class: "controls" });
    row = el("tr", { "data-flag": name },
      el("td", { class: "name", textContent: name }), el("td", { class: "value" }),
      el("td", { class: "expires" }), el("td", {}, ttl), controls);
    $("#flags tbody").append(row);
    return row;
  }

  function flagControls(row, name, value) {
    const controls = $(".controls", row);
    const kind = typeof value;
    if (controls.dataset.kind === kind) return;
    controls.dataset.kind = kind;
    controls.replaceChildren();
    if (kind === "boolean") {
      const on = el("button", { type: "button", class: "on", textContent: "On" });
      const off = el("button", { type: "button", class: "off", textContent: "Off" });
      on.addEventListener("click", () => setFlag(name, true, $(".ttl", row).value));
      off.addEventListener("click", () => setFlag(name, false, $(".ttl", row).value));
      controls.append(on, " ", off);
    } else {
      const input = el("input", { class: "new-value", size: 6, placeholder: "value" });
      const set = el("button", { type: "button", class: "set", textContent: "Set" });
      set.addEventListener("click", () => setFlag(name, parseValue(input.value), $(".ttl", row).value));
      controls.append(input, " ", set);
    }
  }

  function renderFlags(flags, expiries) {
    for (const [name, value] of Object.entries(flags)) {
      const row = flagRow(name);
      const cell = $(".value", row);
      cell.textContent = JSON.stringify(value);
      cell.className = "value " + (value === false ? "bad-text" : value === true ? "yes" : "");
      $(".expires", row).textContent = expiries[name] || "";
      flagControls(row, name, value);
    }
  }

  function parseValue(text) {
    const trimmed = text.trim();
    try { return JSON.parse(trimmed); } catch (e) { return trimmed; }
  }

  async function setFlag(name, value, ttlText) {
    const body = { value };
    const message = $("#flag-message");
    if (ttlText !== undefined && String(ttlText).trim() !== "") {
      body.ttl_s = /^-?\d+$/.test(String(ttlText).trim()) ? Number(ttlText) : ttlText;
    }
    const answer = await api("PUT", "/admin/v1/flags/" + encodeURIComponent(name), body);
    if (answer.status === 200) {
      const d = answer.data;
      setMessage(message, `${d.name}: ${JSON.stringify(d.previous)} → ${JSON.stringify(d.value)}` +
        (d.expires_at ? `, back at ${d.expires_at}` : ""), true);
    } else {
      setMessage(message, apiError(answer), false);
    }
  }

  function renderAudit(entries) {
    $("#audit tbody").replaceChildren(...entries.map((e) => el("tr", {},
      el("td", { textContent: e.at }), el("td", { textContent: e.who }),
      el("td", { textContent: e.name }),
      el("td", { textContent: `${JSON.stringify(e.old)} → ${JSON.stringify(e.new)}` }),
      el("td", { textContent: e.ttl_s ? e.ttl_s + " s" : "" }))));
  }

  // -- activities: create and edit ------------------------------------------------------

  const FIELDS = ["id", "title", "sku_id", "price_cents", "stock", "per_user_limit", "starts_at",
    "ends_at", "payment_timeout_s"];
  const NUMBERS = new Set(["price_cents", "stock", "per_user_limit", "payment_timeout_s"]);

  async function loadActivityList() {
    const answer = await api("GET", "/admin/v1/activities?limit=1000");
    if (answer.status !== 200) return;
    const pick = $("#activity-pick");
    const chosen = pick.value;
    pick.replaceChildren(el("option", { value: "", textContent: "new activity" }),
      ...answer.data.activities.map((a) =>
        el("option", { value: a.id, textContent: `${a.id} · ${a.title} (${a.state})` })));
    pick.value = chosen;
  }

  function formFill(activity) {
    const form = $("#activity-form");
    const extra = {};
    for (const name of FIELDS) form.elements[name].value = activity[name] ?? "";
    form.elements.requires_address.checked = Boolean(activity.requires_address);
    if (activity.skus) {
      extra.skus = activity.skus.map((s) => ({ sku_id: s.sku_id, title: s.title,
        price_cents: s.price_cents, stock: s.stock_left }));
      for (const name of ["sku_id", "price_cents", "stock"]) form.elements[name].value = "";
    }
    if (activity.tiers) extra.tiers = activity.tiers;
    form.elements.extra.value = Object.keys(extra).length ? JSON.stringify(extra) : "";
  }

  async function loadActivity(id) {
    const message = $("#activity-message");
    if (!id) {
      const now = Date.now();
      formFill({ id: "", title: "", sku_id: "sku-1", price_cents: 100, stock: 100,
        per_user_limit: 1, payment_timeout_s: 900,
        starts_at: new Date(now + 60_000).toISOString().replace(/\.\d+Z$/, "Z"),
        ends_at: new Date(now + 3_660_000).toISOString().replace(/\.\d+Z$/, "Z") });
      message.textContent = "";
      return;
    }
    const answer = await api("GET", "/admin/v1/activities/" + encodeURIComponent(id));
    if (answer.status !== 200) { setMessage(message, apiError(answer), false); return; }
    formFill(answer.data);
    $("#activity-pick").value = id;
    setMessage(message, `Loaded ${id} (${answer.data.state}).`, true);
  }

  async function saveActivity(event) {
    event.preventDefault();
    const form = $("#activity-form");
    const message = $("#activity-message");
    const body = {};
    for (const name of FIELDS) {
      const text = form.elements[name].value.trim();
      if (text === "") continue;  // the API names what is missing
      body[name] = NUMBERS.has(name) && /^-?\d+$/.test(text) ? Number(text) : text;
    }
    if (form.elements.requires_address.checked) body.requires_address = true;
    const extraText = form.elements.extra.value.trim();
    if (extraText) {
      let extra;
      try { extra = JSON.parse(extraText); } catch (e) {
        setMessage(message, "More fields: not JSON (" + e.message + ")", false);
        return;
      }
      Object.assign(body, extra);
    }
    const answer = await api("POST", "/admin/v1/activities", body);
    if (answer.status === 201) {
      setMessage(message, `Saved ${answer.data.id}: ${answer.data.state}, stock ` +
        `${answer.data.stock_left}.`, true);
      loadActivityList();
    } else {
      setMessage(message, apiError(answer), false);
    }
  }

  // -- panels that appear once their admin endpoint exists -------------------------------

  // poll() answers the delay until its next run
  async function repeat(poll) {
    if (token === null) return;
    let delay;
    try { delay = await poll(); } catch (e) { delay = POLL_ABSENT_MS; }
    if (token !== null) timeouts.push(setTimeout(() => repeat(poll), delay));
  }

  async function pollQueue() {
    if (token === null) return POLL_QUEUE_MS;
    if (!latest || !latest.activities) return 1000;  // wait for the first snapshot
    const rows = [];
    let absent = latest.activities.length > 0;
    for (const a of latest.activities) {
      let answer;
      try { answer = await api("GET", `/admin/v1/activities/${encodeURIComponent(a.id)}/draw`); }
      catch (e) { continue; }
      // a 404 whose message is aiohttp's "Not Found" means no such route on this gateway
      const noRoute = answer.status === 404 && answer.data && answer.data.error &&
        answer.data.error.message === "Not Found";
      if (!noRoute) absent = false;
      if (noRoute) break;
      if (answer.status !== 200 || !answer.data) continue;
      const d = answer.data;
      rows.push(el("tr", { "data-activity": a.id },
        el("td", { textContent: a.id }), el("td", { class: "num", textContent: fmt(d.registrants) }),
        el("td", { textContent: d.drawn ? "yes" : "no" }),
        el("td", { class: "num", textContent: fmt(d.placed) }),
        el("td", { textContent: d.revealed ? "yes" : "no" })));
    }
    $("#queue tbody").replaceChildren(...rows);
    show($("#queue-panel"), rows.length > 0);
    return absent ? POLL_ABSENT_MS : POLL_QUEUE_MS;
  }

  async function pollRisk() {
    if (token === null) return POLL_RISK_MS;
    const answer = await api("GET", "/admin/v1/risk/hits?limit=20");
    if (answer.status === 404) { show($("#risk-panel"), false); return POLL_ABSENT_MS; }
    const available = answer.status === 200 && answer.data && Array.isArray(answer.data.hits);
    if (!available) return POLL_RISK_MS;  // a 503 (Redis away): keep the last hits shown
    show($("#risk-panel"), true);
    const hits = answer.data.hits;
    $("#risk-count").textContent = hits.length ? `(latest ${hits.length})` : "(none yet)";
    $("#risk tbody").replaceChildren(...hits.map((h) => el("tr", {},
      el("td", { textContent: h.at }), el("td", { textContent: h.rule }),
      el("td", { class: h.mode === "enforced" ? "bad-text" : "warn-text", textContent: h.mode }),
      el("td", { textContent: h.activity_id }), el("td", { textContent: h.subject }))));
    return POLL_RISK_MS;
  }

  // -- wiring -------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("#signin-form").addEventListener("submit", signIn);
    $("#signout").addEventListener("click", () => signOut(""));
    $("#flag-form").addEventListener("submit", (event) => {
      event.preventDefault();
      setFlag($("#flag-name").value.trim(), parseValue($("#flag-value").value), $("#flag-ttl").value);
    });
    $("#activity-form").addEventListener("submit", saveActivity);
    $("#activity-load").addEventListener("click", () => loadActivity($("#activity-pick").value));
    loadActivity("");
    $("#token").focus();
  });
})();
