// Keeps the server-rendered page live: Server-Sent Events from /events, already coalesced by the server.
"use strict";
(function () {
  const trials = new Map();
  let mlflowUrl = null, selected = null, charts = [];
  const live = document.getElementById("live");
  const form = document.getElementById("filters");

  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (v) => v === null || v === undefined ? "–" : (typeof v === "number" && !Number.isInteger(v)
    ? (Math.abs(v) < 1e-3 && v !== 0 ? v.toPrecision(4) : v.toFixed(4)) : String(v));
  const lookup = (obj, path) => path.split(".").reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);

  function hyperparams(row) {
    return Object.keys(row.hyperparams).sort().filter((k) => k !== "spectral_norm").slice(0, 5)
      .map((k) => `${k}=${typeof row.hyperparams[k] === "number" ? fmt(row.hyperparams[k]) : row.hyperparams[k]}`).join(", ");
  }

  function mlflowCell(row) {
    if (!row.mlflow_run_id) return "–";
    const short = esc(row.mlflow_run_id.slice(0, 8));
    if (!mlflowUrl || !row.mlflow_experiment_id) return short;
    const href = `${mlflowUrl.replace(/\/$/, "")}/#/experiments/${row.mlflow_experiment_id}/runs/${row.mlflow_run_id}`;
    return `<a href="${esc(href)}">${short}</a>`;
  }

  function rowHtml(row) {
    const acc = row.final_val_accuracy ?? row.last_val_accuracy;
    const duration = row.duration_ms === null ? "–" : `${(row.duration_ms / 1000).toFixed(1)} s`;
    return `<th scope=row><a class="open" href="api/trials/${esc(row.id)}/curve">${esc(row.id)}</a></th>` +
      `<td>${esc(row.model_run_id)}</td><td>${esc(row.dataset ?? "–")}</td>` +
      `<td class="status ${row.status}">${row.status}</td><td class="hp">${esc(hyperparams(row))}</td>` +
      `<td class="epoch">${row.last_epoch ?? "–"}</td><td class="acc">${fmt(acc)}</td><td>${duration}</td>` +
      `<td>${mlflowCell(row)}</td>`;
  }

  function visible(row) {
    const f = new FormData(form);
    return (!f.get("study") || row.model_run_id === f.get("study")) && (!f.get("dataset") || row.dataset === f.get("dataset"))
      && (!f.get("status") || row.status === f.get("status"));
  }

  function addOption(name, value) {
    const select = form.elements[name];
    if (value && ![...select.options].some((o) => o.value === value)) select.add(new Option(value, value));
  }

  function activity(text) {
    const list = document.getElementById("activity-list");
    const li = document.createElement("li");
    li.innerHTML = `<time>${new Date().toISOString().slice(11, 19)}</time> ${esc(text)}`;
    list.prepend(li);
    while (list.children.length > 15) list.lastElementChild.remove();
  }

  function placeRow(row) {
    const id = `trial-${row.id}`;
    let tr = document.getElementById(id);
    const body = document.querySelector(`#trials-${row.spectral_norm ? "spectral_norm" : "baseline"} tbody`);
    if (!tr) {
      tr = document.createElement("tr");
      tr.id = id;
      body.prepend(tr);
    }
    tr.dataset.trial = row.id; tr.dataset.status = row.status; tr.dataset.study = row.model_run_id;
    tr.dataset.dataset = row.dataset ?? ""; tr.dataset.epoch = row.last_epoch ?? "";
    const html = rowHtml(row);
    if (tr.rendered !== html) {  // rewrite only what changed, and keep the keyboard focus on the trial's link
      const focused = tr.contains(document.activeElement);
      tr.innerHTML = html;
      tr.rendered = html;
      if (focused) tr.querySelector("a.open").focus();
    }
    tr.hidden = !visible(row);
    addOption("study", row.model_run_id); addOption("dataset", row.dataset);
  }

  function applyTrials(rows, replace) {
    if (replace) {
      document.querySelectorAll("table.trials tbody").forEach((b) => { b.textContent = ""; });
      trials.clear();
    }
    for (const row of rows) {
      const before = trials.get(row.id);
      if (!replace && (!before || before.status !== row.status)) {
        activity(`${row.id} ${before ? row.status : "started"}`);
      }
      trials.set(row.id, row);
      placeRow(row);
      if (row.id === selected && before && row.last_epoch !== before.last_epoch) appendPoint(row);
    }
    drawArms();
  }

  function applyVerdict(report) {
    if (!report) return;
    const body = document.getElementById("verdict-body");
    body.querySelectorAll("[data-path]").forEach((el) => {
      const value = lookup(report, el.dataset.path);
      if (el.tagName === "TD") {
        el.dataset.value = value === null || value === undefined ? "" : JSON.stringify(value);
        el.textContent = fmt(value);
      } else {
        el.textContent = value ?? "";
      }
    });
    body.querySelector("ul.warnings").innerHTML = (report.warnings || []).map((w) => `<li>${esc(w)}</li>`).join("");
  }

  function applyQueues(queues) {
    if (!queues) return;
    document.querySelector("#queues tbody").innerHTML = queues.map((q) =>
      `<tr class="${q.name.endsWith(".dlq") && q.messages ? "dead" : ""}"><th scope=row>${esc(q.name)}</th>` +
      `<td>${q.messages}</td><td>${q.consumers}</td></tr>`).join("");
  }

  function drawArms() {
    const svg = document.getElementById("arms-chart");
    const done = [...trials.values()].filter((t) => t.status === "completed" && t.final_val_accuracy !== null);
    if (!done.length) { svg.innerHTML = ""; return; }
    const values = done.map((t) => t.final_val_accuracy);
    const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
    const W = 320, H = 200, x = (sn) => (sn ? 90 : 230), y = (v) => H - 20 - ((v - lo) / span) * (H - 40);
    const byId = new Map(done.map((t) => [t.id, t]));
    let out = `<text x="90" y="${H - 4}" text-anchor="middle">spectral norm</text><text x="230" y="${H - 4}" text-anchor="middle">baseline</text>`;
    for (const t of done) {
      const twin = t.paired_with && byId.get(t.paired_with);
      if (twin && t.spectral_norm && !twin.spectral_norm) {
        out += `<line class="pair" x1="${x(true)}" y1="${y(t.final_val_accuracy)}" x2="${x(false)}" y2="${y(twin.final_val_accuracy)}"/>`;
      }
    }
    for (const t of done) out += `<circle class="${t.spectral_norm ? "sn" : "base"}" cx="${x(t.spectral_norm)}" cy="${y(t.final_val_accuracy)}" r="3"><title>${esc(t.id)} ${fmt(t.final_val_accuracy)}</title></circle>`;
    out += `<text x="4" y="14">${fmt(hi)}</text><text x="4" y="${H - 20}">${fmt(lo)}</text>`;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.innerHTML = out;
  }

  function curveData(epochs) {
    const layers = [...new Set(epochs.flatMap((e) => Object.keys(e.spectral_norms || {})))].sort();
    return {
      curve: [epochs.map((e) => e.epoch), epochs.map((e) => e.train_loss), epochs.map((e) => e.val_loss),
        epochs.map((e) => e.train_accuracy), epochs.map((e) => e.val_accuracy)],
      layers,
      sigma: [epochs.map((e) => e.epoch), ...layers.map((l) => epochs.map((e) => (e.spectral_norms || {})[l] ?? null))],
    };
  }

  let detail = null;
  function drawDetail(epochs) {
    charts.forEach((c) => c.destroy());
    charts = [];
    detail = {epochs};
    const data = curveData(epochs);
    const width = chartWidth();
    const series = ["epoch", "train loss", "val loss", "train accuracy", "val accuracy"].map((label, i) =>
      i === 0 ? {label} : {label, stroke: ["", "#c44", "#e88", "#44c", "#88e"][i], width: 1.5});
    charts.push(new uPlot({title: "learning curve", width, height: 220, scales: {x: {time: false}}, series}, data.curve, document.getElementById("curve-chart")));
    if (data.layers.length) {
      const colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"];
      charts.push(new uPlot({title: "per-layer largest singular value σ", width, height: 220, scales: {x: {time: false}},
        series: [{label: "epoch"}, ...data.layers.map((l, i) => ({label: l, stroke: colors[i % colors.length], width: 1.5}))]},
      data.sigma, document.getElementById("sigma-chart")));
    }
  }

  const chartWidth = () => Math.min(640, document.getElementById("detail").clientWidth - 24 || 320);
  window.addEventListener("resize", () => charts.forEach((c) => c.setSize({width: chartWidth(), height: 220})));

  function appendPoint(row) {
    if (!detail || detail.epochs.some((e) => e.epoch === row.last_epoch)) return;
    detail.epochs.push({epoch: row.last_epoch, train_loss: row.last_train_loss, val_loss: row.last_val_loss,
      train_accuracy: row.last_train_accuracy, val_accuracy: row.last_val_accuracy, spectral_norms: row.last_spectral_norms});
    const data = curveData(detail.epochs);
    if (charts.length === (data.layers.length ? 2 : 1)) {
      charts[0].setData(data.curve);
      if (charts[1]) charts[1].setData(data.sigma);
    } else {
      drawDetail(detail.epochs);
    }
  }

  async function open(id) {
    selected = id;
    const section = document.getElementById("detail");
    section.hidden = false;
    document.getElementById("detail-id").textContent = id;
    const response = await fetch(`api/trials/${encodeURIComponent(id)}/curve`);
    if (!response.ok) return;
    const body = await response.json();
    if (selected === id) drawDetail(body.epochs);
    section.scrollIntoView({block: "nearest"});
  }

  document.getElementById("arms").addEventListener("click", (event) => {
    const link = event.target.closest("a.open");
    if (!link) return;
    event.preventDefault();
    open(link.closest("tr").dataset.trial);
  });

  form.addEventListener("change", () => {
    const params = new URLSearchParams(new FormData(form));
    history.replaceState(null, "", `?${params}`);
    for (const row of trials.values()) {
      const tr = document.getElementById(`trial-${row.id}`);
      if (tr) tr.hidden = !visible(row);
    }
  });
  form.addEventListener("submit", (event) => event.preventDefault());

  const source = new EventSource("events");
  source.addEventListener("snapshot", (event) => {
    const snapshot = JSON.parse(event.data);
    mlflowUrl = snapshot.mlflow_url;
    applyTrials(snapshot.trials, true);
    applyVerdict(snapshot.verdict);
    applyQueues(snapshot.queues);
    live.textContent = "live";
  });
  // The server already coalesces (one push per 50 ms at most, the latest row per trial): apply at once.
  source.addEventListener("trials", (event) => applyTrials(JSON.parse(event.data), false));
  source.addEventListener("verdict", (event) => applyVerdict(JSON.parse(event.data)));
  source.addEventListener("queues", (event) => applyQueues(JSON.parse(event.data)));
  source.addEventListener("error", () => { live.textContent = "reconnecting…"; });
})();
