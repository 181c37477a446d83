// The sandbox page: one phone per customer number, the fault switches and the activity log.
// No build step: plain DOM. Every change on the server arrives as a server-sent event; the
// page then fetches /sandbox/state and draws it again.
'use strict';

const params = new URLSearchParams(location.search);
// A customer is a phone number, or a business-scoped user id (`US.1349…`) for one with a
// WhatsApp username who shares no number.
const isUser = n => /^[A-Z]{2}\.[0-9]{8,20}$/.test(n);
let numbers = (params.get('phones') || localStorage.getItem('sandbox.phones') || '447700900123')
  .split(',').filter(n => /^[0-9]{8,15}$/.test(n) || isUser(n));
let state = { chats: {}, faults: {}, activity: [] };
const openLists = new Set();

const save = () => localStorage.setItem('sandbox.phones', numbers.join(','));
const post = (url, body, raw) => fetch(url, {
  method: 'POST',
  headers: raw ? {} : { 'content-type': 'application/json' },
  body: raw ? body : JSON.stringify(body),
});

// A link as the phone opens it: Stripe's hosted checkout is played by this sandbox.
function href(url) {
  const m = url.match(/^https:\/\/checkout\.stripe\.com\/c\/pay\/([A-Za-z0-9_]+)/);
  return m ? '/checkout/' + m[1] : url;
}

function textWithLinks(text) {
  const span = document.createElement('span');
  for (const part of String(text).split(/(https?:\/\/\S+)/)) {
    if (/^https?:\/\//.test(part)) {
      const a = document.createElement('a');
      a.href = href(part); a.target = '_blank'; a.textContent = part;
      a.dataset.testid = part.includes('checkout.stripe.com') ? 'payment-link' : 'link';
      span.append(a);
    } else {
      span.append(part);
    }
  }
  return span;
}

const TICKS = { accepted: '🕓', sent: '✓', delivered: '✓✓', read: '✓✓', failed: '⚠ not delivered' };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function botBubble(wa, m) {
  const b = m.body, bubble = el('div', 'bubble bot');
  bubble.dataset.testid = 'bot-message';
  bubble.dataset.kind = b.type;
  if (b.type === 'text') {
    bubble.append(textWithLinks(b.text.body));
  } else if (b.type === 'image') {
    if (m.status === 'failed') {
      bubble.append(el('em', '', 'image could not be loaded'));
    } else if (m.status === 'accepted') {
      bubble.append(el('em', '', 'downloading image…'));
    } else {
      const img = el('img', 'portrait');
      img.src = '/sandbox/media/' + encodeURIComponent(m.id);
      img.alt = b.image.caption || 'image';
      img.dataset.testid = 'bot-image';
      bubble.append(img);
    }
    if (b.image.caption) bubble.append(el('div', 'caption', b.image.caption));
  } else if (b.type === 'interactive') {
    const i = b.interactive;
    bubble.append(textWithLinks(i.body.text));
    if (i.type === 'button') {
      const row = el('div', 'buttons');
      for (const btn of i.action.buttons) {
        const x = el('button', 'reply', btn.reply.title);
        x.dataset.testid = 'reply-button';
        x.onclick = () => post(`/sandbox/phone/${wa}/reply`, { kind: 'button', context: m.id, id: btn.reply.id, title: btn.reply.title });
        row.append(x);
      }
      bubble.append(row);
    } else if (i.type === 'list') {
      const open = el('button', 'list-open', '☰ ' + i.action.button);
      open.dataset.testid = 'list-open';
      const rows = el('div', 'list-rows');
      rows.hidden = !openLists.has(m.id);
      open.onclick = () => { rows.hidden = !rows.hidden; rows.hidden ? openLists.delete(m.id) : openLists.add(m.id); draw(); };
      for (const section of i.action.sections) {
        if (section.title) rows.append(el('div', 'section', section.title));
        for (const r of section.rows) {
          const x = el('button', 'row');
          x.dataset.testid = 'list-row';
          x.append(el('b', '', r.title));
          if (r.description) x.append(el('small', '', r.description));
          x.onclick = () => { openLists.delete(m.id); post(`/sandbox/phone/${wa}/reply`, { kind: 'list', context: m.id, id: r.id, title: r.title }); };
          rows.append(x);
        }
      }
      bubble.append(open, rows);
    }
  } else if (b.type === 'template') {
    const params = (b.template.components || []).flatMap(c => c.parameters || []).map(p => p.text).join(', ');
    bubble.append(el('em', '', `template “${b.template.name}”${params ? ': ' + params : ''}`));
  } else {
    bubble.append(el('code', '', JSON.stringify(b)));
  }
  const tick = el('span', 'tick ' + m.status, TICKS[m.status] || m.status);
  tick.dataset.testid = 'tick';
  bubble.append(tick);
  return bubble;
}

function customerBubble(m) {
  const bubble = el('div', 'bubble me');
  bubble.dataset.testid = 'my-message';
  if (m.body.text !== undefined) bubble.append(el('span', '', m.body.text));
  if (m.body.reply !== undefined) bubble.append(el('span', 'reply-echo', '↩ ' + m.body.reply));
  if (m.body.photo !== undefined) {
    const img = el('img', 'photo');
    img.src = '/sandbox/media/' + encodeURIComponent(m.body.photo);
    bubble.append(img);
  }
  const ok = m.status === '200';
  bubble.append(el('span', 'tick' + (ok || m.status === 'sending' ? '' : ' failed'),
    ok ? '✓✓' : m.status === 'sending' ? '🕓' : '⚠ app answered ' + m.status));
  return bubble;
}

// A message's bubble, kept from the last draw when only its status changed (the tick is then
// redrawn in place), so its buttons stay the same elements; drawn anew when anything else did.
// An image's body shows its status (downloading, failed), so any change redraws it.
function bubble(phone, wa, m) {
  const cache = phone.bubbles || (phone.bubbles = new Map());
  const key = (m.from_customer ? 'in:' : 'out:') + m.id;
  const isImage = !m.from_customer && m.body.type === 'image';
  const shape = JSON.stringify({ ...m, status: isImage ? m.status : '' }) + (openLists.has(m.id) ? ' open' : '');
  const fresh = () => (m.from_customer ? customerBubble(m) : botBubble(wa, m));
  const kept = cache.get(key);
  if (kept && kept.shape === shape) {
    if (kept.status !== m.status) {
      kept.node.querySelector('.tick').replaceWith(fresh().querySelector('.tick'));
      kept.status = m.status;
    }
    return kept.node;
  }
  const node = fresh();
  cache.set(key, { shape, status: m.status, node });
  return node;
}

function drawPhone(wa) {
  let phone = document.querySelector(`.phone[data-number="${wa}"]`);
  if (!phone) {
    phone = document.getElementById('phone-template').content.firstElementChild.cloneNode(true);
    phone.dataset.number = wa;
    phone.querySelector('.number').textContent = isUser(wa) ? '@customer · no number shared' : '+' + wa;
    if (isUser(wa)) phone.dataset.username = 'true';
    phone.querySelector('.close').onclick = () => { numbers = numbers.filter(n => n !== wa); save(); phone.remove(); };
    const input = phone.querySelector('.text');
    phone.querySelector('.compose').onsubmit = e => {
      e.preventDefault();
      if (!input.value.trim()) return;
      post(`/sandbox/phone/${wa}/text`, { body: input.value });
      input.value = '';
    };
    phone.querySelector('input[type=file]').onchange = async e => {
      for (const file of e.target.files) await post(`/sandbox/phone/${wa}/photo`, file, true);
      e.target.value = '';
    };
    document.getElementById('phones').append(phone);
  }
  const chat = phone.querySelector('.chat');
  // Redraw only what changed: an element a person is about to tap stays put otherwise.
  const drawn = JSON.stringify((state.chats[wa] || {}).messages || []) + [...openLists].join();
  if (phone.dataset.drawn === drawn) return;
  phone.dataset.drawn = drawn;
  const atBottom = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 40;
  const bubbles = ((state.chats[wa] || {}).messages || []).map(m => bubble(phone, wa, m));
  // Only nodes that differ are moved: a node taken out and put back between a tap's press and
  // release loses the tap (a message's read tick arrives right after it is shown, just when a
  // person taps its button).
  bubbles.forEach((b, i) => { if (chat.children[i] !== b) chat.insertBefore(b, chat.children[i] || null); });
  while (chat.children.length > bubbles.length) chat.lastElementChild.remove();
  if (atBottom) chat.scrollTop = chat.scrollHeight;
  const unread = ((state.chats[wa] || {}).messages || []).some(m => !m.from_customer && m.status === 'delivered');
  if (unread && document.visibilityState === 'visible') post(`/sandbox/phone/${wa}/read`, {});
}

function draw() {
  for (const wa of numbers) drawPhone(wa);
  document.getElementById('fault-drop').checked = !!state.faults.drop_astria_callbacks;
  document.getElementById('fault-graph').value = state.faults.graph || '';
  document.getElementById('fault-stripe').checked = !!state.faults.stripe_slow;
  document.getElementById('fault-refunds').checked = !!state.faults.refunds_fail;
  document.getElementById('fault-astria').checked = !!state.faults.astria_refuses;
  const refunds = document.getElementById('refunds');
  refunds.replaceChildren(...(state.refunds || []).map(r => {
    const li = document.createElement('li');
    li.textContent = `${r.id}: ${(r.amount / 100).toFixed(2)} ${String(r.currency).toUpperCase()} of ${r.payment_intent} (${r.status})`;
    return li;
  }));
  if (!refunds.childElementCount) refunds.append(Object.assign(document.createElement('li'), { textContent: 'None yet.' }));
  const log = document.getElementById('activity');
  log.replaceChildren(...state.activity.slice().reverse().slice(0, 60).map(a => {
    const li = el('li', a.party);
    li.append(el('time', '', new Date(a.at * 1000).toLocaleTimeString()), ' ', el('b', '', a.party), ' ', a.text);
    return li;
  }));
}

let pending = false;
async function refresh() {
  if (pending) return;
  pending = true;
  try {
    state = await (await fetch('/sandbox/state')).json();
    draw();
  } finally {
    pending = false;
  }
}

function faults() {
  post('/sandbox/faults', {
    drop_astria_callbacks: document.getElementById('fault-drop').checked,
    graph: document.getElementById('fault-graph').value,
    stripe_slow: document.getElementById('fault-stripe').checked,
    refunds_fail: document.getElementById('fault-refunds').checked,
    astria_refuses: document.getElementById('fault-astria').checked,
  });
}
for (const id of ['fault-drop', 'fault-graph', 'fault-stripe', 'fault-refunds', 'fault-astria']) document.getElementById(id).onchange = faults;

document.getElementById('add-username').onclick = () => {
  let id;
  do { id = 'US.' + String(Math.floor(1e11 + Math.random() * 9e11)); } while (numbers.includes(id));
  numbers.push(id); save(); draw();
};

document.getElementById('add-phone').onsubmit = e => {
  e.preventDefault();
  const n = document.getElementById('new-number').value.trim();
  if (!numbers.includes(n)) { numbers.push(n); save(); }
  document.getElementById('new-number').value = '';
  draw();
};

const events = new EventSource('/sandbox/events');
events.onmessage = () => refresh();
events.onopen = () => refresh();
document.addEventListener('visibilitychange', () => refresh());
refresh();
