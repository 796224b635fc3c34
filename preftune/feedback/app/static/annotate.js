// Keyboard shortcuts, page-less submits, the lease countdown and undoing a skip on the annotate
// page. Model output is written with textContent, or as the HTML the server rendered from its
// markdown (markdown.py: raw HTML is never passed through, so no markup of the model's gets here).
(function () {
  "use strict";
  const section = document.getElementById("task");
  const form = document.getElementById("judge");
  if (!section || !form) return;
  const kind = section.dataset.kind;
  const project = section.dataset.project;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const status = document.getElementById("status");
  const revising = section.dataset.mode === "revise";  // changing an earlier judgement: a plain form post
  let busy = false;
  let tieNext = false;
  let digits = "";  // a response number being typed: "1" then "0" is response 10 of 12
  let digitTimer = null;

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function showError(message) {
    status.textContent = message;
    status.hidden = false;
  }

  function check(name, value) {
    const input = form.querySelector(`input[name="${name}"][value="${value}"]`);
    if (input) { input.checked = input.type === "checkbox" ? !input.checked : true; input.dispatchEvent(new Event("change", { bubbles: true })); }
  }

  function rankSelects() { return Array.from(form.querySelectorAll('select[name^="rank_"]')); }

  function rankByKey(pos) {
    const selects = rankSelects();
    if (pos >= selects.length || selects[pos].value) return;
    const used = selects.map((s) => Number(s.value || 0));
    const top = Math.max(0, ...used);
    selects[pos].value = String(tieNext && top > 0 ? top : top + 1);
    tieNext = false;
    saveDraft();
  }

  // A number is complete when no longer one can follow (with 12 responses "2" is, "1" may
  // become 10-12) or after a pause.
  function commitDigits() {
    clearTimeout(digitTimer);
    digitTimer = null;
    const n = Number(digits);
    digits = "";
    if (n >= 1) rankByKey(n - 1);
  }

  function typeDigit(key) {
    digits += key;
    if (Number(digits) * 10 > rankSelects().length) commitDigits();
    else { clearTimeout(digitTimer); digitTimer = setTimeout(commitDigits, 800); }
  }

  function clearRanks() {
    rankSelects().forEach((s) => { s.value = ""; });
    tieNext = false;
    digits = "";
    saveDraft();
  }

  // A draft of the current assignment's answer survives a reload and a new log-in (localStorage,
  // this browser only); it is dropped once the judgement is in.
  const draftKey = () => `preftune-draft:${project}:${document.getElementById("assignment_id").value}`;

  function saveDraft() {
    if (revising) return;
    const fields = Array.from(form.elements).filter((e) => e.name && e.name !== "client_key" && e.name !== "csrf_token"
                                                      && e.name !== "assignment_id")
      .map((e) => [e.name, e.value, e.type === "radio" || e.type === "checkbox" ? e.checked : null]);
    try { localStorage.setItem(draftKey(), JSON.stringify(fields)); } catch (e) { /* storage off: no draft */ }
  }

  function restoreDraft() {
    if (revising) return;
    let fields = null;
    try { fields = JSON.parse(localStorage.getItem(draftKey()) || "null"); } catch (e) { fields = null; }
    if (!Array.isArray(fields)) return;
    fields.forEach(([name, value, checked]) => {
      form.querySelectorAll(`[name="${CSS.escape(name)}"]`).forEach((e) => {
        if (checked === null) e.value = value;
        else if (e.value === value) e.checked = checked;
      });
    });
    form.dispatchEvent(new Event("change", { bubbles: true }));
  }

  function dropDraft() {
    try { localStorage.removeItem(draftKey()); } catch (e) { /* nothing stored */ }
  }

  function sessionExpired() {
    status.replaceChildren("Your session has expired; your answer is kept as a draft. ");
    const link = document.createElement("a");
    link.href = `/login?next=${encodeURIComponent(window.location.pathname)}`;
    link.textContent = "Log in again";
    status.append(link);
    status.hidden = false;
  }

  function body() {
    const data = new FormData(form);
    const out = { client_key: data.get("client_key"), rationale: data.get("rationale") || null };
    if (kind === "pairwise") {
      out.choice = data.get("choice");
      out.strength = data.get("strength") ? Number(data.get("strength")) : null;
    } else if (kind === "rating") {
      out.rating = data.get("rating") ? Number(data.get("rating")) : null;
      out.flags = data.getAll("flags");
    } else {
      const groups = new Map();
      rankSelects().forEach((s, pos) => { if (s.value) { const r = Number(s.value); groups.set(r, [...(groups.get(r) || []), pos]); } });
      out.ranking = Array.from(groups.keys()).sort((a, b) => a - b).map((r) => groups.get(r));
    }
    return out;
  }

  async function api(method, url, payload) {
    const response = await fetch(url, {
      method, credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: payload === undefined ? undefined : JSON.stringify(payload),
    });
    if (response.status === 204) return null;
    const json = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = new Error(json.detail || `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return json;
  }

  function renderText(container, text) {
    container.textContent = text;
  }

  // Both views of a text: the server's markdown rendering and the plain text ("Plain text").
  function fillText(parent, text, html) {
    parent.querySelector(".text.md").innerHTML = html;
    renderText(parent.querySelector(".text.raw"), text);
  }

  const plain = document.getElementById("plain");
  try { plain.checked = localStorage.getItem("preftune-plain") === "1"; } catch (e) { /* storage off */ }
  plain.addEventListener("change", () => {
    try { localStorage.setItem("preftune-plain", plain.checked ? "1" : "0"); } catch (e) { /* storage off */ }
  });

  // The lease: counted down from the seconds the server gave (the browser's clock may be off).
  const lease = document.getElementById("lease");
  let leaseEnd = 0;
  let leaseTimer = null;

  function clock(seconds) {
    if (seconds >= 3600) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
    return `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
  }

  function tickLease() {
    const left = Math.max(0, Math.round((leaseEnd - Date.now()) / 1000));
    lease.classList.toggle("low", left < 60);
    if (left > 0) {
      lease.replaceChildren(Object.assign(document.createElement("span"), { id: "lease-left", textContent: clock(left) }),
                            " left for this task");
    } else {
      lease.textContent = "Time is up: the task may go to another annotator (your answer still counts if nobody has taken it)";
      clearInterval(leaseTimer);
    }
  }

  function startLease(seconds) {
    if (!lease) return;
    leaseEnd = Date.now() + 1000 * seconds;
    clearInterval(leaseTimer);
    tickLease();
    leaseTimer = setInterval(tickLease, 1000);
  }
  if (lease) startLease(Number(lease.dataset.secondsLeft));

  function show(next) {
    const cards = form.querySelectorAll(".response");
    if (!next) { window.location.reload(); return; }  // all done: the server renders that page
    if (next.responses.length !== cards.length) { window.location.reload(); return; }
    form.reset();
    document.getElementById("assignment_id").value = next.assignment_id;
    document.getElementById("client_key").value = randomKey();
    const prompt = document.getElementById("prompt");
    prompt.replaceChildren(...next.messages.map((m, i) => {
      const div = document.createElement("div");
      div.className = "msg";
      const role = document.createElement("span");
      role.className = "role";
      renderText(role, m.role);
      div.append(role);
      for (const view of ["md", "raw"]) {
        const text = document.createElement("div");
        text.className = `text ${view}`;
        text.dir = "auto";
        div.append(text);
      }
      fillText(div, m.content, next.html.messages[i]);
      return div;
    }));
    cards.forEach((card, i) => { fillText(card, next.responses[i], next.html.responses[i]); card.classList.remove("picked"); });
    startLease(next.seconds_left);
    document.getElementById("done").textContent = next.progress.done;
    document.getElementById("remaining").textContent = next.progress.remaining;
    status.hidden = true;
    window.scrollTo(0, 0);
  }

  async function submit(skip) {
    if (busy) return;
    if (digits) commitDigits();
    if (revising) {
      // the prototype's submit: the form's own `submit` is shadowed by the button of that id
      if (!skip && form.checkValidity()) HTMLFormElement.prototype.submit.call(form);
      else if (!skip) form.reportValidity();
      return;
    }
    if (!skip && !form.checkValidity()) { form.reportValidity(); return; }
    busy = true;
    const id = document.getElementById("assignment_id").value;
    const next = () => api("GET", `/api/v1/projects/${encodeURIComponent(project)}/next?html=true`);
    try {
      let shown;
      if (skip) {
        await api("POST", `/api/v1/assignments/${id}/skip`);
        shown = await next();
      } else {  // one round trip: the answer to the submit carries the next task
        shown = (await api("POST", `/api/v1/assignments/${id}/judgement?next=true&html=true`, body())).next;
      }
      dropDraft();
      undoForm.hidden = !skip;
      if (skip) document.getElementById("undo-id").value = id;
      if (skip && !shown) { window.location.href = `${window.location.pathname}?skipped=${id}`; return; }
      show(shown);
    } catch (err) {
      if (err.status === 401) { saveDraft(); sessionExpired(); }
      else if (err.status === 409) {  // the lease ran out and the task went to someone else: move on
        try { show(await next()); } catch (again) { showError(again.message); return; }
        showError(`${err.message}; here is the next task.`);
      } else showError(err.message);
    } finally {
      busy = false;
    }
  }

  // Undo the last skip: that task comes back (the one shown since returns to the pool).
  const undoForm = document.getElementById("undo");
  async function undoSkip() {
    if (busy || undoForm.hidden) return;
    busy = true;
    try {
      show(await api("POST", `/api/v1/assignments/${document.getElementById("undo-id").value}/unskip?html=true`));
      undoForm.hidden = true;
      document.activeElement.blur();  // not left on the hidden Undo button, where Enter would do nothing
    } catch (err) {
      if (err.status === 401) sessionExpired();
      else { showError(err.message); undoForm.hidden = true; }
    } finally {
      busy = false;
    }
  }
  undoForm.addEventListener("submit", (event) => { event.preventDefault(); undoSkip(); });

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit(event.submitter && event.submitter.id === "skip");
  });

  form.addEventListener("change", saveDraft);
  form.addEventListener("input", saveDraft);
  restoreDraft();

  form.addEventListener("change", () => {
    if (kind !== "pairwise") return;
    const choice = new FormData(form).get("choice");
    form.querySelectorAll(".response").forEach((card, i) => card.classList.toggle("picked", choice === "AB"[i]));
    const directionless = choice === "tie" || choice === "both_bad";  // strength is how much A or B wins by
    form.querySelectorAll('input[name="strength"]').forEach((s) => {
      s.disabled = directionless;
      if (directionless) s.checked = false;
    });
  });

  const FLAG_KEYS = { h: "hallucination", m: "harmful", i: "ignores_instruction", u: "unhelpful", o: "other" };
  const CHOICE_KEYS = { a: "A", b: "B", t: "tie", x: "both_bad" };

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.metaKey) return;
    const typing = event.target.matches("textarea, input[type=text], select");
    // Enter on a focused button or link does what that control does (Skip skips, Log out logs out).
    if (event.key === "Enter" && event.target.closest("a, button")) return;
    if (event.key === "Enter" && (!typing || event.ctrlKey)) { event.preventDefault(); submit(false); return; }
    if (typing || event.ctrlKey) return;
    const key = event.key.toLowerCase();
    if (key === "s") { event.preventDefault(); submit(true); return; }
    if (key === "z" && !undoForm.hidden) { event.preventDefault(); undoSkip(); return; }
    if (kind === "pairwise") {
      if (CHOICE_KEYS[key]) check("choice", CHOICE_KEYS[key]);
      else if ("1234".includes(key) && key.length === 1) check("strength", key);
    } else if (kind === "rating") {
      const scale = Number(section.dataset.scale);
      if (/^[1-9]$/.test(key) && Number(key) <= scale) check("rating", key);
      else if (FLAG_KEYS[key]) check("flags", FLAG_KEYS[key]);
    } else {
      if (key === "=") tieNext = true;
      else if (key === "backspace" || (key === "0" && !digits)) clearRanks();
      else if (/^[0-9]$/.test(key)) typeDigit(key);
    }
  });
})();
