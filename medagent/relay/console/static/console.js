(function () {
  'use strict';
  var live = document.getElementById('live');
  document.addEventListener('submit', function (ev) {
    var form = ev.target, question = form.getAttribute('data-confirm');
    if (question && !window.confirm(question)) { ev.preventDefault(); }
  });
  if (!live || live.getAttribute('data-enabled') !== '1' || !window.EventSource) { return; }
  function field(root, name) { return root.querySelector('[data-field="' + name + '"]'); }
  function setState(el, state) {
    if (!el) { return; }
    el.textContent = state;
    el.className = 'state s-' + state.replace(/[^a-z]/g, '');
  }
  function when(t) {
    if (t === null || t === undefined) { return '\u2014'; }
    return new Date(t * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }
  function age(s) {
    if (s === null || s === undefined) { return '\u2014'; }
    s = Math.max(0, Math.floor(s));
    if (s < 60) { return s + 's'; }
    if (s < 3600) { return Math.floor(s / 60) + 'm ' + (s % 60) + 's'; }
    if (s < 86400) { return Math.floor(s / 3600) + 'h ' + Math.floor(s % 3600 / 60) + 'm'; }
    return Math.floor(s / 86400) + 'd ' + Math.floor(s % 86400 / 3600) + 'h';
  }
  function cell(text) { var td = document.createElement('td'); td.textContent = text; return td; }
  function link(href, text, name) {
    var td = document.createElement('td'), a = document.createElement('a');
    a.href = href; a.textContent = text; if (name) { a.setAttribute('data-field', name); }
    td.appendChild(a); return td;
  }
  var detail = document.getElementById('detail-state');
  var source = new EventSource('/console/events' + (detail ?
    '?push=' + encodeURIComponent(detail.getAttribute('data-push')) : ''));
  source.onopen = function () { live.textContent = 'live'; live.setAttribute('data-state', 'live'); };
  source.onerror = function () { live.textContent = 'reconnecting\u2026'; live.setAttribute('data-state', 'down'); };
  source.addEventListener('agent', function (ev) {
    var d = JSON.parse(ev.data), row = document.getElementById('agent-' + d.agent);
    if (!row) { return; }
    setState(field(row, 'state'), d.connected ? 'online' : 'offline');
    row.className = d.connected ? 'online' : 'offline';
    if (d.connected) {
      if (field(row, 'since')) { field(row, 'since').textContent = when(d.since); }
      if (field(row, 'version')) { field(row, 'version').textContent = d.version || '\u2014'; }
      if (field(row, 'node')) { field(row, 'node').textContent = d.node || '\u2014'; }
    } else if (field(row, 'since')) { field(row, 'since').textContent = '\u2014'; }
  });
  source.addEventListener('sessions', function (ev) {
    // the agents this node holds as the stream opens: rows that changed meanwhile
    var d = JSON.parse(ev.data), rows = document.querySelectorAll('[data-agent]');
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i], id = row.getAttribute('data-agent'), held = d.agents[id];
      var node = field(row, 'node'), state = field(row, 'state');
      if (held && state && state.textContent !== 'online') {
        setState(state, 'online');
        if (field(row, 'since')) { field(row, 'since').textContent = when(held.since); }
        if (node) { node.textContent = d.node; }
      } else if (!held && state && state.textContent === 'online' && node &&
                 node.textContent === d.node) {
        setState(state, 'offline');
      }
    }
  });
  source.addEventListener('queue', function (ev) {
    var d = JSON.parse(ev.data), rows = document.querySelectorAll('#fleet tr[data-agent]');
    for (var i = 0; i < rows.length; i++) {
      var q = d.agents[rows[i].getAttribute('data-agent')] || {open: 0, oldestAge: null, errors: 0};
      field(rows[i], 'open').textContent = q.open;
      field(rows[i], 'oldest').textContent = age(q.oldestAge);
      field(rows[i], 'errors').textContent = q.errors;
    }
  });
  // the inbound log: a message recorded on this node (never its payload nor patient id)
  source.addEventListener('inbound', function (ev) {
    var d = JSON.parse(ev.data), table = document.getElementById('inbound');
    if (!table || table.getAttribute('data-live') !== '1' ||
        document.getElementById('inbound-' + d.id)) { return; }
    var body = table.tBodies[0], empty = body.querySelector('tr.empty');
    if (empty) { body.removeChild(empty); }
    var tr = document.createElement('tr');
    tr.id = 'inbound-' + d.id; tr.setAttribute('data-inbound', d.id);
    tr.appendChild(cell(when(d.received)));
    tr.appendChild(link('/console/agent/' + encodeURIComponent(d.agent), d.agent));
    tr.appendChild(cell(d.channel));
    tr.appendChild(cell(d.messageType || d.contentType));
    tr.appendChild(link('/console/inbound/' + encodeURIComponent(d.id),
                        d.controlId || d.sopUid || d.id.slice(0, 12), 'control'));
    if (table.getAttribute('data-phi') === '1') { tr.appendChild(cell('')); }
    tr.appendChild(cell(d.accession || ''));
    var oc = document.createElement('td'), span = document.createElement('span');
    span.setAttribute('data-field', 'outcome'); setState(span, d.outcome);
    oc.appendChild(span); tr.appendChild(oc);
    var answer = cell([d.status, d.ack].filter(function (x) { return x !== null && x !== undefined; }).join(' ') || '\u2014');
    answer.setAttribute('data-field', 'answer'); tr.appendChild(answer);
    body.insertBefore(tr, body.firstChild);
    var count = document.querySelector('#inbound-caption [data-count]');
    if (count) {
      var n = parseInt(count.getAttribute('data-count'), 10) + 1;
      count.setAttribute('data-count', String(n)); count.textContent = String(n);
    }
  });
  source.addEventListener('push', function (ev) {
    var d = JSON.parse(ev.data), row = document.getElementById('push-' + d.id);
    // an older state never replaces a newer one (a read may arrive after a later event)
    var rank = {queued: 0, sent: 1, accepted: 2};
    function newer(el) {
      var shown = parseFloat(el.getAttribute('data-updated') || '0');
      var was = (field(el, 'state') || {}).textContent;
      if (d.updated < shown || (d.updated === shown &&
          (rank[d.state] === undefined ? 3 : rank[d.state]) <
          (rank[was] === undefined ? 3 : rank[was]))) { return false; }
      el.setAttribute('data-updated', String(d.updated));
      return true;
    }
    if (row) {
      if (newer(row)) {
        setState(field(row, 'state'), d.state);
        field(row, 'attempts').textContent = d.attempts;
      }
    } else {
      var table = document.getElementById('messages');
      if (table && table.getAttribute('data-live') === '1' && d['new']) {
        var body = table.tBodies[0], empty = body.querySelector('tr.empty');
        if (empty) { body.removeChild(empty); }
        var tr = document.createElement('tr');
        tr.id = 'push-' + d.id; tr.setAttribute('data-push', d.id);
        tr.setAttribute('data-updated', String(d.updated));
        tr.appendChild(cell(when(d.created)));
        tr.appendChild(link('/console/agent/' + encodeURIComponent(d.agent), d.agent));
        tr.appendChild(cell(d.destination));
        tr.appendChild(link('/console/message/' + encodeURIComponent(d.id), d.controlId || d.id.slice(0, 12), 'control'));
        tr.appendChild(cell(d.accession || ''));
        var st = document.createElement('td'), span = document.createElement('span');
        span.setAttribute('data-field', 'state'); setState(span, d.state);
        st.appendChild(span); tr.appendChild(st);
        var at = cell(String(d.attempts)); at.setAttribute('data-field', 'attempts'); tr.appendChild(at);
        body.insertBefore(tr, body.firstChild);
        var count = document.querySelector('#messages-caption [data-count]');
        if (count) {
          var n = parseInt(count.getAttribute('data-count'), 10) + 1;
          count.setAttribute('data-count', String(n)); count.textContent = String(n);
        }
      }
    }
    if (detail && detail.getAttribute('data-push') === d.id && newer(detail)) {
      var shown = field(detail, 'state'), moved = shown.textContent !== d.state;
      setState(shown, d.state);
      var attempts = document.querySelector('dl.facts [data-field="attempts"]');
      if (attempts) { attempts.textContent = d.attempts; }
      var list = document.getElementById('timeline');
      if (list && moved) {
        var li = document.createElement('li'), t = document.createElement('time');
        t.textContent = when(d.updated); li.appendChild(t);
        li.appendChild(document.createTextNode(' ' + d.state)); list.appendChild(li);
      }
    }
  });
  source.addEventListener('alert', function (ev) {
    var d = JSON.parse(ev.data), badge = document.getElementById('alert-count');
    if (badge) { badge.textContent = d.active; badge.hidden = !d.active; }
  });
})();
