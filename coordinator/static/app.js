// The status page: polls /api/v1/status every 2 s and redraws. Every string that comes from a
// worker (its name, device, reason) is set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US", {maximumFractionDigits: 1});

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  if (s < 90) return s + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " days";
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function drawChart(canvas, rounds) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 48, R = 12, T = 12, B = 28;
  ctx.clearRect(0, 0, W, H);
  const pts = rounds.filter((r) => r.state === "done" && r.ended_at);
  const series = [["loss", "#58a6ff"], ["val_loss", "#f0883e"]];
  const values = pts.flatMap((r) => series.map(([k]) => r[k]).filter((v) => v !== null && v !== undefined));
  canvas.dataset.points = String(pts.length);
  ctx.fillStyle = "#8a96a3"; ctx.font = "12px system-ui, sans-serif";
  if (pts.length === 0 || values.length === 0) { ctx.fillText("waiting for the first round…", L, H / 2); return; }
  const t0 = pts[0].ended_at, t1 = Math.max(pts[pts.length - 1].ended_at, t0 + 1);
  const lo = Math.min(...values), hi = Math.max(...values), pad = (hi - lo) * 0.08 || 0.1;
  const y0 = lo - pad, y1 = hi + pad;
  const x = (t) => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = (v) => T + (H - T - B) * (1 - (v - y0) / (y1 - y0));
  ctx.strokeStyle = "#26303a"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4, yy = y(v);
    ctx.beginPath(); ctx.moveTo(L, yy); ctx.lineTo(W - R, yy); ctx.stroke();
    ctx.fillText(v.toFixed(2), 4, yy + 4);
  }
  ctx.fillText("0", L, H - 8);
  const span = duration(t1 - t0);
  ctx.fillText(span, W - R - ctx.measureText(span).width, H - 8);
  for (const [key, color] of series) {
    const p = pts.filter((r) => r[key] !== null && r[key] !== undefined);
    if (!p.length) continue;
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2; ctx.beginPath();
    p.forEach((r, i) => { const X = x(r.ended_at), Y = y(r[key]); i ? ctx.lineTo(X, Y) : ctx.moveTo(X, Y); });
    ctx.stroke();
    p.forEach((r) => { ctx.beginPath(); ctx.arc(x(r.ended_at), y(r[key]), 2.5, 0, 7); ctx.fill(); });
  }
}

function renderWorkers(workers, now) {
  const body = $("workers").tBodies[0];
  body.replaceChildren(...workers.map((w) => {
    const tr = el("tr");
    tr.dataset.worker = w.id;
    tr.append(el("td", w.name, "name"));
    const st = el("td");
    st.append(el("span", w.state, "state " + w.state));
    if (w.reason) st.append(el("span", w.reason, "reason"));
    const score = w.standing === null ? "—" : `${w.standing.toFixed(2)} (last ${w.score === null ? "—" : w.score.toFixed(2)})`;
    tr.append(st, el("td", w.device), el("td", fmt(w.tokens_per_second)), el("td", fmt(w.tokens_contributed)),
              el("td", fmt(w.tokens_credited), "credited"),
              el("td", fmt(w.tokens_verified), "verified"), el("td", score, "score"),
              el("td", duration(now - w.last_seen) + " ago"));
    const refused = el("td", "", "refused");
    if (w.refused) refused.append(el("span", fmt(w.refused)), el("span", w.last_refusal, "reason"));
    tr.append(refused);
    return tr;
  }));
}

function renderReducers(reducers) {
  $("reducers-section").hidden = !reducers.length;
  $("reducers").tBodies[0].replaceChildren(...reducers.map((r) => {
    const tr = el("tr");
    tr.dataset.reducer = r.name;
    const st = el("td");
    st.append(el("span", r.state, "state " + r.state));
    tr.append(el("td", r.name, "name"), st, el("td", r.peer_id.slice(0, 16) + "…"), el("td", fmt(r.rounds)),
              el("td", duration(r.seen_seconds_ago) + " ago"),
              el("td", r.failed_round >= 0 ? `round ${r.failed_round}: ${r.last_error}` : ""));
    return tr;
  }));
}

function render(s) {
  const run = s.run;
  $("run-id").textContent = `run ${run.id} · ${run.task} · ${run.model || ""}`;
  $("health").textContent = `${s.health.state}: ${s.health.reason}`;
  $("health").dataset.state = s.health.state;
  $("round").textContent = fmt(run.round);
  $("phase").textContent = `${run.phase} · ${fmt(run.round_tokens)} / ${fmt(run.tokens_per_round)} tokens`;
  $("tokens").textContent = fmt(run.tokens_trained);
  $("budget").textContent = `of ${fmt(run.max_tokens)} (${(100 * run.tokens_trained / run.max_tokens).toFixed(1)}%)`;
  $("tokens-bar").style.width = Math.min(100, 100 * run.tokens_trained / run.max_tokens) + "%";
  $("tps").textContent = fmt(run.tokens_per_second);
  $("eta").textContent = duration(run.eta_seconds);
  $("val").textContent = run.val_loss === null ? "" : `validation loss ${run.val_loss.toFixed(4)}`;
  drawChart($("loss-chart"), s.rounds);
  renderWorkers(s.workers, s.generated_at);
  renderReducers(s.reducers || []);
  const sh = s.shards, total = Math.max(sh.total, 1);
  for (const k of ["done", "leased", "pending"]) $("sh-" + k).style.width = (100 * sh[k] / total) + "%";
  $("epoch").textContent = `epoch ${sh.epoch}`;
  $("shard-text").textContent = `${sh.done} done · ${sh.leased} leased · ${sh.pending} pending of ${sh.total}`;
  $("top").replaceChildren(...s.top_contributors.map((c) =>
    el("li", `${c.name} — ${fmt(c.tokens_credited)} tokens credited (${fmt(c.tokens_verified)} verified) of ${fmt(c.tokens_contributed)}`)));
  $("events").replaceChildren(...s.events.map((e) => {
    const li = el("li");
    li.append(el("span", new Date(e.at * 1000).toLocaleTimeString(), "kind"), el("span", e.kind, "kind"),
              document.createTextNode([e.worker, e.detail].filter(Boolean).join(": ")));
    return li;
  }));
  document.body.dataset.loaded = "1";
}

async function refresh() {
  try {
    const r = await fetch("/api/v1/status", {cache: "no-store"});
    render(await r.json());
  } catch (err) {
    $("health").textContent = "coordinator unreachable: " + err;
    $("health").dataset.state = "stalled";
  }
}

refresh();
setInterval(refresh, 2000);
