// The mqrpc broker dashboard: renders the figures the broker sends every second (server-sent events on
// /api/events). Every string from the broker is set as text, never as markup.
"use strict";

/** The last snapshot, for rates. */
let previous = null;

function $(id) {
  return document.getElementById(id);
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1024 / 1024).toFixed(1) + " MiB";
}

function duration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function notice(text, error) {
  const p = $("notice");
  p.textContent = text;
  p.className = error ? "error" : "";
}

/** Per second between the last snapshot and this one, for one counter of one queue. */
function rate(snapshot, queue, field) {
  if (!previous) return "-";
  const before = previous.queues.find((q) => q.name === queue.name);
  const seconds = (snapshot.at_ms - previous.at_ms) / 1000;
  if (!before || seconds <= 0) return "-";
  return Math.max(0, (queue[field] - before[field]) / seconds).toFixed(1);
}

function button(label, action, queue, onClick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.queue = queue;
  b.addEventListener("click", onClick);
  return b;
}

function renderQueues(snapshot) {
  const body = $("queues").tBodies[0];
  const rows = snapshot.queues.map((queue) => {
    const tr = document.createElement("tr");
    tr.id = "queue-" + queue.name;
    tr.dataset.queue = queue.name;
    tr.append(
      cell(queue.name, "name"),
      cell(String(queue.ready), "num depth"),
      cell(String(queue.delayed), "num delayed"),
      cell(String(queue.unacked), "num unacked"),
      cell(String(queue.consumers), "num consumers"),
      cell(rate(snapshot, queue, "published"), "num publish"),
      cell(rate(snapshot, queue, "delivered"), "num deliver"),
      cell(rate(snapshot, queue, "acked"), "num ack"),
      cell(queue.dlq === null ? "-" : String(queue.dlq), queue.dlq ? "num dlq warn" : "num dlq"),
    );
    const actions = document.createElement("td");
    if (queue.dlq) {
      actions.append(
        button("inspect", "inspect", queue.name, () => inspect(queue.name)),
        button("replay", "replay", queue.name, () => replay(queue.name)),
      );
    }
    tr.append(actions);
    return tr;
  });
  body.replaceChildren(...rows);
}

function renderConnections(snapshot) {
  const body = $("peers").tBodies[0];
  const rows = snapshot.connections.map((connection) => {
    const tr = document.createElement("tr");
    tr.append(
      cell(String(connection.id), "num"),
      cell(connection.peer),
      cell(connection.name || "-"),
      cell(String(connection.version), "num"),
      cell(duration(snapshot.at_ms - connection.connected_ms), "num"),
      cell(bytes(connection.outbound_bytes), "num"),
    );
    return tr;
  });
  body.replaceChildren(...rows);
}

function render(snapshot) {
  $("connections").textContent = String(snapshot.broker.connections);
  $("inboxes").textContent = String(snapshot.broker.inboxes);
  $("held").textContent = bytes(snapshot.broker.bytes_held);
  $("accepted").textContent = String(snapshot.broker.accepted);
  $("rejected").textContent = String(snapshot.broker.rejected);
  $("updated").textContent = "updated " + new Date(snapshot.at_ms).toLocaleTimeString();
  renderQueues(snapshot);
  renderConnections(snapshot);
  previous = snapshot;
}

async function inspect(queue) {
  const response = await fetch("/api/dlq/" + encodeURIComponent(queue), { credentials: "same-origin" });
  const answer = await response.json();
  if (!response.ok) {
    notice("could not list the dead letters of " + queue + ": " + answer.error, true);
    return;
  }
  $("dlq-title").textContent = "Dead letters of " + queue + " (" + answer.dead_letters.length + ")";
  const rows = answer.dead_letters.map((letter) => {
    const tr = document.createElement("tr");
    tr.append(
      cell(letter.id),
      cell(letter.service + "." + letter.method),
      cell(String(letter.attempt), "num"),
      cell(letter.key || "-"),
      cell(letter.last_status === null ? "-" : String(letter.last_status), "num"),
      cell(letter.args, "args"),
    );
    return tr;
  });
  $("dlq").tBodies[0].replaceChildren(...rows);
  $("dlq-panel").hidden = false;
}

async function replay(queue) {
  const response = await fetch("/api/dlq/" + encodeURIComponent(queue) + "/replay", {
    method: "POST",
    credentials: "same-origin",
    headers: { "X-Mqrpc": "replay" },
  });
  const answer = await response.json();
  if (!response.ok) {
    notice("could not replay the dead letters of " + queue + ": " + answer.error, true);
    return;
  }
  notice("replayed " + answer.replayed + " dead letter(s) onto " + queue);
  $("dlq-panel").hidden = true;
}

function connect() {
  const events = new EventSource("/api/events");
  events.onopen = () => {
    $("status").textContent = "live";
    $("status").className = "status live";
  };
  events.onmessage = (event) => render(JSON.parse(event.data));
  events.onerror = () => {
    // EventSource reconnects by itself.
    $("status").textContent = "reconnecting";
    $("status").className = "status down";
  };
}

connect();
