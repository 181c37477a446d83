// The operator console's behaviour: log in with the admin token (kept in this tab's
// sessionStorage), read the maintenance JSON routes with it, draw the funnel as inline SVG, and
// offer the actions: replay a dead letter, resolve or refund a payment issue, resend the
// portraits of an order WhatsApp did not deliver. Every value from the
// server goes into the page as text (textContent), never as HTML.
"use strict";

const KEY = "astria-admin-token";
const SERIES = ["chats", "orders", "paid", "delivered"];
const $ = (sel) => document.querySelector(sel);

function token() { return sessionStorage.getItem(KEY) || ""; }

function setStatus(text) { $("#status").textContent = text; }

// A refused token has said so already; anything else is shown as it is.
function report(err) { if (!err.refused) setStatus(err.message); }

async function api(path, options = {}) {
  const res = await fetch(path, {
    ...options,
    headers: { authorization: `Bearer ${token()}`, ...(options.headers || {}) },
  });
  if (res.status === 401) {
    sessionStorage.removeItem(KEY);
    show(false);
    setStatus("That token was refused.");
    throw Object.assign(new Error("That token was refused."), { refused: true });
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

const when = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 16) + " UTC" : "");
const ago = (ms) => {
  const m = Math.max(0, Math.round((Date.now() - ms) / 60000));
  return m < 120 ? `${m} min ago` : m < 2880 ? `${Math.round(m / 60)} h ago` : `${Math.round(m / 1440)} d ago`;
};
const money = (a) => (a ? `${(a.amount_minor / 100).toFixed(2)} ${a.currency.toUpperCase()}` : "");

function fillTable(table, rows, empty) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const cols = table.tHead.rows[0].cells.length;
    body.append(el("tr", {}, el("td", { class: "empty", colspan: cols }, empty)));
    return;
  }
  for (const r of rows) body.append(r);
}

function drawFunnel(days) {
  const W = 900, H = 220, pad = 28, groupW = (W - pad) / days.length, barW = Math.max(2, (groupW - 6) / SERIES.length);
  const max = Math.max(1, ...days.flatMap((d) => SERIES.map((s) => d[s])));
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H + 24}`, role: "img" });
  chart.append(svg("line", { x1: pad, y1: H, x2: W, y2: H, stroke: "#999" }));
  const top = svg("text", { x: 0, y: 12, "font-size": 11, fill: "#666" });
  top.textContent = String(max);
  chart.append(top);
  days.forEach((d, i) => {
    const x0 = pad + i * groupW + 3;
    SERIES.forEach((s, j) => {
      const h = Math.round((d[s] / max) * (H - 16));
      const bar = svg("rect", { x: x0 + j * barW, y: H - h, width: barW - 1, height: h, class: `s-${s}`, "data-series": s, "data-day": d.day, "data-value": d[s] });
      const tip = svg("title");
      tip.textContent = `${new Date(d.day).toISOString().slice(0, 10)} ${s}: ${d[s]}`;
      bar.append(tip);
      chart.append(bar);
    });
    if (days.length <= 31 && (i % Math.ceil(days.length / 14) === 0 || i === days.length - 1)) {
      const label = svg("text", { x: x0, y: H + 16, "font-size": 11, fill: "#666" });
      label.textContent = new Date(d.day).toISOString().slice(5, 10);
      chart.append(label);
    }
  });
  const legend = el("div", { class: "legend" }, ...SERIES.map((s) => el("span", {}, el("i", { class: `s-${s}` }), s)));
  $("#funnel").replaceChildren(legend, chart);
  const totals = SERIES.map((s) => days.reduce((n, d) => n + d[s], 0));
  $("#funnel-totals").replaceChildren(
    el("tr", {}, ...SERIES.map((s) => el("th", {}, s))),
    el("tr", {}, ...totals.map((t, j) => el("td", { "data-total": SERIES[j] }, t))),
  );
  $("#funnel-days").textContent = days.length;
}

function messageText(m) {
  const msg = m.message || {};
  switch (msg.kind) {
    case "text": return msg.body;
    case "buttons": return `${msg.body}\n[${(msg.buttons || []).map((b) => b.title).join("] [")}]`;
    case "list": return `${msg.body}\n(${msg.button}: ${(msg.rows || []).map((r) => r.title).join(", ")})`;
    case "image": return `🖼 image${msg.caption ? ": " + msg.caption : ""}`;
    case "document": return `📄 document${msg.caption ? ": " + msg.caption : ""}`;
    case "template": return `template (${(msg.parameters || []).join(", ")})`;
    default: return m.kind;
  }
}

// The order open below the list, shown again on every refresh (a replay changes its events).
let openOrder = null;

async function showOrder(id, row) {
  openOrder = id;
  document.querySelectorAll("#attention tr.selected").forEach((r) => r.classList.remove("selected"));
  if (row) row.classList.add("selected");
  const box = $("#order");
  box.hidden = false;
  if (!box.childElementCount) box.replaceChildren(el("p", { class: "hint" }, "Loading…"));
  const s = await api(`/maintenance/console/api/orders/${encodeURIComponent(id)}`);
  const o = s.order;
  const facts = el("p", {},
    el("strong", {}, `Order ${o.id}`), ` · ${o.status} · pack ${o.pack_id} · ${money({ amount_minor: o.price_minor, currency: o.currency })}`,
    ` · ${o.photos} photos · ${o.images} portraits · created ${when(o.created_at)}`,
    o.paid_at ? ` · paid ${when(o.paid_at)}` : "", o.training_started_at ? ` · training since ${when(o.training_started_at)}` : "",
    o.astria_tune_id ? ` · tune ${o.astria_tune_id}` : "");
  const chat = el("div", { class: "chat", id: "order-chat" },
    ...s.messages.map((m) => el("div", { class: `bubble${m.status === "failed" ? " failed" : ""}`, "data-kind": m.kind },
      messageText(m), el("small", {}, `${when(m.created_at)} · ${m.status}${m.delivery_status ? " · " + m.delivery_status : ""}${m.last_error ? " · " + m.last_error : ""}`))));
  if (!s.messages.length) chat.append(el("p", { class: "hint" }, "No message sent to this customer yet."));
  const state = s.conversation ? s.conversation.state : "";
  const events = el("table", { id: "order-events" },
    el("thead", {}, el("tr", {}, el("th", {}, "when"), el("th", {}, "event"), el("th", {}, "status"), el("th", {}, "attempts"), el("th", {}, "last error"))),
    el("tbody", {}, ...s.events.map((e) => el("tr", {}, el("td", {}, when(e.created_at)), el("td", {}, e.event_type), el("td", {}, e.status), el("td", {}, e.attempts), el("td", {}, e.last_error || "")))));
  box.replaceChildren(facts,
    el("div", { class: "cols" },
      el("div", {}, el("h3", {}, `Messages to ${o.wa_id}`), el("p", { class: "hint" }, `Conversation state: ${state || "unknown"}. What the customer wrote is not stored.`), chat),
      el("div", {}, el("h3", {}, "Events"), events)));
}

async function loadAttention() {
  const a = await api("/maintenance/console/api/attention");
  $("#stuck-minutes").textContent = a.stuck_minutes;
  fillTable($("#attention"), a.orders.map((o) => {
    const tr = el("tr", { class: `clickable${o.order_id === openOrder ? " selected" : ""}`, "data-order": o.order_id, "data-reason": o.reason },
      el("td", {}, el("code", {}, o.order_id)), el("td", { class: `reason-${o.reason}` }, o.reason), el("td", {}, o.status),
      el("td", { title: when(o.since) }, ago(o.since)), el("td", {}, o.wa_id), el("td", {}, o.pack_id), el("td", {}, o.detail),
      el("td", {}, o.status === "delivery_failed" ? resendButton(o.order_id) : ""));
    tr.addEventListener("click", () => showOrder(o.order_id, tr).catch(report));
    return tr;
  }), "Nothing needs a human.");
}

// Sends a delivery_failed order's portraits again (once WhatsApp takes messages again).
function resendButton(orderId) {
  const button = el("button", { "data-resend": orderId }, "Resend");
  button.addEventListener("click", async (ev) => {
    ev.stopPropagation();
    button.disabled = true;
    try {
      const r = await api(`/maintenance/orders/${encodeURIComponent(orderId)}/resend`, { method: "POST" });
      setStatus(`Order ${orderId}: ${r.resent} portrait(s) queued again.`);
      await refresh();
    } catch (err) { report(err); button.disabled = false; }
  });
  return button;
}

async function loadDeadLetters() {
  const d = await api("/maintenance/dead-letters");
  fillTable($("#dead-letters"), d.dead_letters.map((e) => {
    const button = el("button", { "data-replay": e.id }, "Replay");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api(`/maintenance/dead-letters/${encodeURIComponent(e.id)}/replay`, { method: "POST" });
        setStatus(`Dead letter ${e.id} handed back to the relay.`);
        await refresh();
      } catch (err) { report(err); button.disabled = false; }
    });
    return el("tr", { "data-event": e.id }, el("td", {}, el("code", {}, e.id)), el("td", {}, e.event_type), el("td", {}, e.channel),
      el("td", {}, e.attempts), el("td", {}, e.last_error || ""), el("td", {}, button));
  }), "No dead letters.");
}

async function loadPaymentIssues() {
  const p = await api("/maintenance/payment-issues");
  fillTable($("#payment-issues"), p.payment_issues.map((i) => {
    const note = el("input", { type: "text", placeholder: "what was done (e.g. refunded in Stripe)", "aria-label": "resolution note", maxlength: 500 });
    const button = el("button", { "data-resolve": i.event_id }, "Resolved");
    button.addEventListener("click", async () => {
      if (!note.value.trim()) { setStatus("Say what was done before marking it resolved."); note.focus(); return; }
      button.disabled = true;
      try {
        await api(`/maintenance/payment-issues/${encodeURIComponent(i.event_id)}/resolve`, {
          method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ note: note.value.trim() }),
        });
        setStatus(`Payment issue ${i.event_id} resolved.`);
        await refresh();
      } catch (err) { report(err); button.disabled = false; }
    });
    // Refund: the app's own refund path (one refund per payment, whoever presses it).
    const refund = i.refund;
    const refundable = i.kind !== "dispute" && !(refund && ["requested", "pending", "succeeded", "requires_action"].includes(refund.status));
    const refundButton = el("button", { "data-refund": i.event_id }, "Refund");
    refundButton.hidden = !refundable;
    refundButton.addEventListener("click", async () => {
      refundButton.disabled = true;
      try {
        const r = await api(`/maintenance/payment-issues/${encodeURIComponent(i.event_id)}/refund`, { method: "POST" });
        setStatus(`Refund of ${i.event_id}: ${r.refund}.`);
        await refresh();
      } catch (err) { report(err); refundButton.disabled = false; }
    });
    const refundState = refund ? `refund ${refund.status}${refund.last_error ? ": " + refund.last_error : ""}` : "";
    return el("tr", { "data-issue": i.event_id }, el("td", {}, el("code", {}, i.event_id)), el("td", {}, i.kind), el("td", {}, i.order_id || ""),
      el("td", {}, money(i.amount)), el("td", {}, i.detail, refundState ? el("br") : "", el("small", { "data-refund-state": "" }, refundState)),
      el("td", {}, note, " ", button, " ", refundButton));
  }), "No open payment issues.");
}

async function refresh() {
  const f = await api("/maintenance/console/api/funnel");
  drawFunnel(f.days);
  await Promise.all([loadAttention(), loadDeadLetters(), loadPaymentIssues(), openOrder ? showOrder(openOrder) : null]);
  setStatus(`Updated ${new Date().toLocaleTimeString()}`);
}

function show(loggedIn) {
  $("#login").hidden = loggedIn;
  $("#console").hidden = !loggedIn;
  $("#logout").hidden = !loggedIn;
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("#token").value);
    $("#token").value = "";
    show(true);
    refresh().catch(report);
  });
  $("#logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    openOrder = null;
    $("#order").replaceChildren();
    $("#order").hidden = true;
    show(false);
    setStatus("");
  });
  if (token()) { show(true); refresh().catch(report); }
  setInterval(() => { if (token()) refresh().catch(report); }, 15000);
});
