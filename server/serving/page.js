// fedfuse serve's page: served as a file, as its CSP allows no inline script.
// With tokens, the caller signs in with one (typed, or given as #token=... in the address:
// a fragment never reaches the server or its logs) and it stays in this tab's sessionStorage.
// The operator picks any user; a user sees their own recommendations; anyone may try titles.
"use strict";
const $ = (id) => document.getElementById(id);
const SHOWN_HISTORY = 10;  // older likes are counted, not listed
const TOKEN_KEY = "fedfuse-token";
let mode = "user";
let session = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, attrs);
  node.append(...children);
  return node;
}

const signed = (v) => (v >= 0 ? "+" : "\u2212") + Math.abs(v).toFixed(2);

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(path, body) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = {headers};
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new ApiError(data.error || response.statusText, response.status);
  return data;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setMode(next) {
  mode = next;
  $("mode-user").classList.toggle("on", mode === "user");
  $("mode-liked").classList.toggle("on", mode === "liked");
  $("by-user").hidden = mode !== "user";
  $("by-liked").hidden = mode !== "liked";
  showError("");
}

function renderHistory(items, used, hint) {
  const list = $("history-list");
  const shown = Math.max(used, SHOWN_HISTORY);
  list.replaceChildren(...items.slice(0, shown).map((h, i) => el("li",
    {className: i < used ? "" : "unused"},
    h.title, h.elsewhere ? el("span", {className: "tag"}, "from elsewhere") : "")));
  if (items.length > shown) {
    list.append(el("li", {className: "empty"}, `and ${items.length - shown} older`));
  }
  if (!items.length) list.append(el("li", {className: "empty"}, "nothing liked yet"));
  $("history-hint").textContent = hint;
}

async function loadUser() {
  const user = $("user").value.trim();
  if (!user) return;
  try {
    const data = await api("/api/history", session.role === "operator" ? {user} : {});
    const used = Math.min(data.history_len, data.liked.length);
    renderHistory(data.liked, used, `${data.liked.length} liked of ${data.seen} seen; ` +
      `the ${used} newest drive the ranking (seen items are never recommended).`);
    showError("");
  } catch (err) {
    renderHistory([], 0, "");
    showError(err.message);
  }
}

function breakdown(rec, scale) {
  const history = rec.because.reduce((sum, share) => sum + share.value, 0);
  const parts = [["your history", history], ["popular here", rec.prior],
                 ["its description", rec.text], ["base", rec.base]];
  const rows = parts.map(([name, value]) => {
    const fill = el("i", {className: value >= 0 ? "up" : "down"});
    fill.style.width = `${(50 * Math.abs(value)) / scale}%`;  // CSSOM: allowed by the CSP
    return el("tr", {}, el("td", {}, name), el("td", {}, el("div", {className: "bar"}, fill)),
      el("td", {className: "num"}, signed(value)));
  });
  rows.push(el("tr", {className: "total"}, el("td", {}, "score"), el("td"),
    el("td", {className: "num"}, signed(rec.score))));
  return el("table", {className: "breakdown"}, el("tbody", {}, ...rows));
}

function renderRecs(data) {
  const recs = data.recommendations;
  const who = data.user === null ? "you" : `user ${data.user}`;
  $("recs-heading").textContent = `Top ${recs.length} on ${data.platform} for ${who}`;
  const scale = Math.max(1e-9, ...recs.flatMap((r) => [
    Math.abs(r.because.reduce((s, x) => s + x.value, 0)), Math.abs(r.prior),
    Math.abs(r.text), Math.abs(r.base)]));
  $("recs").replaceChildren(...recs.map((rec, i) => {
    const shares = el("details", {},
      el("summary", {}, "every history item's share (against the catalogue's average)"),
      el("ul", {}, ...rec.because.map((s) =>
        el("li", {}, `${signed(s.value)}  ${data.history[s.history].title}`))));
    return el("li", {className: "rec"},
      el("div", {className: "rank"}, String(i + 1)),
      el("div", {className: "title"}, rec.title,
        el("span", {className: "score"}, `score ${rec.score.toFixed(3)}`)),
      breakdown(rec, scale),
      el("p", {className: "explanation"}, rec.explanation),
      rec.because.length ? shares : "");
  }));
  if (!recs.length) $("recs").append(el("li", {className: "empty"}, "nothing left to recommend"));
}

async function recommend() {
  const k = Number($("k").value);
  const body = mode === "user"
    ? {user: $("user").value.trim(), k}
    : {liked: $("liked").value.split("\n").map((t) => t.trim()).filter(Boolean), k};
  $("go").disabled = true;
  try {
    const data = await api("/api/recommend", body);
    if (mode === "user") await loadUser();
    else renderHistory(data.history, data.history.length,
      "Titles from elsewhere are encoded as text for this request only.");
    renderRecs(data);
    showError("");
  } catch (err) {
    showError(err.message);
  } finally {
    $("go").disabled = false;
  }
}

function signIn() {
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  start();
}

async function start() {
  showError("");
  try {
    session = await api("/api/session");
  } catch (err) {
    const signedOut = err.status === 401;
    if (signedOut) sessionStorage.removeItem(TOKEN_KEY);
    $("signin").hidden = !signedOut;
    $("controls").hidden = signedOut;
    $("summary").textContent = signedOut ? "sign in to see recommendations" : "";
    if (!signedOut) showError(err.message);
    return;
  }
  $("signin").hidden = true;
  $("controls").hidden = false;
  document.title = `${session.platform} · FedFuse`;
  $("heading").textContent = `${session.platform}: your homepage`;
  const users = session.users === null ? "" : ` · ${session.users} users`;
  $("summary").textContent = `${session.items} items${users} · ` +
    "federated, differentially private model";
  if (session.role === "operator") {
    const listed = await api("/api/users?limit=1000");
    $("user-list").replaceChildren(...listed.users.map((u) => el("option", {value: u})));
    $("user-hint").textContent = `${listed.total} users; the list shows ${listed.users.length}.`;
    if (listed.users.length) $("user").value = listed.users[0];
  } else {
    $("user").value = session.user;
    $("user").readOnly = true;
    $("user-hint").textContent = "Signed in: your own recommendations.";
  }
  await loadUser();
}

function init() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
    history.replaceState(null, "", location.pathname);  // the token leaves the address bar
  }
  $("mode-user").addEventListener("click", () => setMode("user"));
  $("mode-liked").addEventListener("click", () => setMode("liked"));
  $("user").addEventListener("change", loadUser);
  $("go").addEventListener("click", recommend);
  $("signin-go").addEventListener("click", signIn);
  start();
}

init();
