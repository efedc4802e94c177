// retinafm's web app: the behaviour of every page, in plain JavaScript (no framework, no build step, nothing
// fetched from the network). The pages are server-rendered shells; <main data-page="..."> says which one this
// is and data-* attributes carry the server's limits. Everything shown comes from the JSON API and is put in
// the page as text (textContent, never innerHTML), so a file or run name cannot inject markup.
"use strict";

(function () {
  // ---- helpers ---------------------------------------------------------------------------------------------

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "className") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of [].concat(children || [])) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function $(id) {
    return document.getElementById(id);
  }

  // The API's refusals are {"detail": "..."}; FastAPI's own validation errors are {"detail": [{loc, msg}]}.
  function detailText(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((d) => (d && d.msg ? (d.loc ? d.loc.filter((p) => p !== "body").join(".") + ": " : "") + d.msg
        : JSON.stringify(d))).join("; ");
    }
    return detail === undefined ? "" : JSON.stringify(detail);
  }

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body || null;
    }
  }

  // fetch with the cookie (same origin), JSON in and out, and every failure turned into a sentence.
  async function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    opts.headers = Object.assign({ Accept: "application/json" }, opts.headers);
    if (opts.json !== undefined) {
      opts.body = JSON.stringify(opts.json);
      opts.headers["Content-Type"] = "application/json";
      delete opts.json;
    }
    let response;
    try {
      response = await fetch(path, opts);
    } catch (err) {
      throw new ApiError(0, "Could not reach the server (" + err.message + "). Is `retinafm serve` still running?");
    }
    const type = response.headers.get("Content-Type") || "";
    let body = null;
    if (type.includes("application/json")) {
      try {
        body = await response.json();
      } catch (err) {
        body = null;
      }
    }
    if (!response.ok) {
      let message = body && body.detail !== undefined ? detailText(body.detail) : response.statusText;
      if (response.status === 401) message = (message || "A token is required") + " (log in at /login).";
      if (response.status === 413 && !message) message = "The upload is too large for this server.";
      throw new ApiError(response.status, message || "The server answered " + response.status + ".", body);
    }
    if (body === null) throw new ApiError(response.status, "The server's answer to " + path + " was not JSON.");
    return body;
  }

  function showMessage(text, kind) {
    const box = $("message");
    if (!box) return;
    box.textContent = text || "";
    box.className = "message " + (kind || "error");
    box.hidden = !text;
  }

  function showError(err, what) {
    const text = (what ? what + ": " : "") + (err && err.message ? err.message : String(err));
    showMessage(text, "error");
    if (window.console) console.error(text);
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "number") {
      if (!Number.isFinite(value)) return "–";
      if (Number.isInteger(value)) return String(value);
      return value.toFixed(digits === undefined ? 3 : digits);
    }
    return String(value);
  }

  // A metric may be a number or {"value", "ci_low", "ci_high"}: "0.912 (0.871–0.948)".
  function fmtMetric(metric) {
    if (metric && typeof metric === "object") {
      const ci = metric.ci_low !== undefined && metric.ci_low !== null && metric.ci_high !== undefined &&
        metric.ci_high !== null ? " (" + fmt(metric.ci_low) + "–" + fmt(metric.ci_high) + ")" : "";
      return fmt(metric.value) + ci;
    }
    return fmt(metric);
  }

  // The headline metrics first (the report's order), then whatever else there is, at most `limit`.
  const HEADLINE = ["auroc_macro", "auroc", "auprc_macro", "accuracy", "balanced_accuracy", "accuracy_macro",
    "f1_macro", "kappa", "r2_macro", "mae_macro", "rmse_macro", "pearson_macro"];

  function metricList(metrics, limit) {
    if (!metrics || typeof metrics !== "object") return [];
    const names = Object.keys(metrics).filter((n) => {
      const v = metrics[n];
      return typeof v === "number" || (v && typeof v === "object" && "value" in v);
    });
    names.sort((a, b) => {
      const ia = HEADLINE.indexOf(a), ib = HEADLINE.indexOf(b);
      return (ia < 0 ? 999 : ia) - (ib < 0 ? 999 : ib);
    });
    return names.slice(0, limit || names.length);
  }

  function metricsCell(metrics, limit) {
    const names = metricList(metrics, limit);
    if (!names.length) return el("td", { className: "muted", text: "–" });
    return el("td", {}, el("dl", { className: "metrics" },
      names.flatMap((n) => [el("dt", { text: n }), el("dd", { text: fmtMetric(metrics[n]) })])));
  }

  function when(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
  }

  function bytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1024 / 1024).toFixed(1) + " MiB";
  }

  // ---- Models ----------------------------------------------------------------------------------------------

  async function modelsPage() {
    const status = $("models-status"), table = $("models-table"), body = table.querySelector("tbody");
    let data;
    try {
      data = await api("/api/models");
    } catch (err) {
      status.textContent = "";
      showError(err, "Could not list the models");
      return;
    }
    const models = data.models || [];
    if (!models.length) {
      status.textContent = "No checkpoints under the runs folder yet: fine-tune one on the Jobs page, or start the " +
        "server with --runs pointing at a folder of runs.";
      return;
    }
    status.textContent = models.length + (models.length === 1 ? " model" : " models");
    for (const m of models) {
      const metrics = m.metrics || {};
      body.append(el("tr", {}, [
        el("td", {}, [el("code", { text: m.id })]),
        el("td", { text: m.kind || "–" }),
        el("td", { text: m.task || "–" }),
        el("td", { text: (m.outputs || []).join(", ") || "–" }),
        el("td", { text: [m.model, m.arch && m.arch !== m.model ? "(" + m.arch + ")" : ""].join(" ").trim() || "–" }),
        el("td", { className: "nowrap", text: m.input_size ? m.input_size + " px" : "–" }),
        metricsCell(metrics.val, 3),
        metricsCell(metrics.test, 3),
        el("td", {}, el("a", { href: "/predict?model=" + encodeURIComponent(m.id), text: "Predict" })),
      ]));
    }
    table.hidden = false;
  }

  // ---- Predict ---------------------------------------------------------------------------------------------

  function predictPage(main) {
    const form = $("predict-form"), select = $("model"), input = $("files"), drop = $("drop"), chosen = $("chosen");
    const status = $("predict-status"), button = $("predict-button");
    const limits = {
      files: Number(main.dataset.maxFiles) || Infinity,
      file: Number(main.dataset.maxFileBytes) || Infinity,
      request: Number(main.dataset.maxRequestBytes) || Infinity,
    };
    let files = [];
    let csvUrl = null;

    function showChosen() {
      clear(chosen);
      for (const f of files) chosen.append(el("li", {}, [f.name, el("span", { className: "muted", text: " " + bytes(f.size) })]));
      button.textContent = files.length > 1 ? "Predict " + files.length + " files" : "Predict";
    }

    function add(list) {
      const known = new Set(files.map((f) => f.name + "/" + f.size));
      for (const f of Array.from(list)) if (!known.has(f.name + "/" + f.size)) files.push(f);
      showMessage("");
      showChosen();
    }

    input.addEventListener("change", () => add(input.files));
    drop.addEventListener("click", (event) => {
      if (event.target.tagName !== "LABEL" && event.target !== input) input.click();
    });
    drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        input.click();
      }
    });
    for (const name of ["dragenter", "dragover"]) {
      drop.addEventListener(name, (event) => {
        event.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      if (event.dataTransfer && event.dataTransfer.files.length) add(event.dataTransfer.files);
    });
    // A file dropped beside the zone would make the browser navigate away to it.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());

    $("clear-button").addEventListener("click", () => {
      files = [];
      input.value = "";
      showChosen();
      showMessage("");
      status.textContent = "";
      $("results").hidden = true;
    });

    (async () => {
      try {
        const data = await api("/api/models");
        clear(select);
        const models = data.models || [];
        if (!models.length) {
          select.append(el("option", { value: "", text: "No models under the runs folder" }));
          showMessage("There are no checkpoints under the runs folder yet: fine-tune one on the Jobs page.", "info");
          return;
        }
        const wanted = new URLSearchParams(window.location.search).get("model");
        for (const m of models) {
          const label = m.id + " — " + (m.task || "?") + (m.outputs && m.outputs.length ? ": " + m.outputs.join(", ") : "");
          select.append(el("option", { value: m.id, text: label, selected: m.id === wanted }));
        }
      } catch (err) {
        clear(select);
        select.append(el("option", { value: "", text: "Models unavailable" }));
        showError(err, "Could not list the models");
      }
    })();

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      showMessage("");
      if (!select.value) return showMessage("Choose a model first.");
      if (!files.length) return showMessage("Choose or drop one or more images first.");
      if (files.length > limits.files) {
        return showMessage("This server takes at most " + limits.files + " files per request; you chose " +
          files.length + ".");
      }
      const big = files.filter((f) => f.size > limits.file);
      if (big.length) {
        return showMessage(big.map((f) => f.name).join(", ") + ": larger than this server's limit of " +
          bytes(limits.file) + " per file.");
      }
      const total = files.reduce((sum, f) => sum + f.size, 0);
      if (total > limits.request) {
        return showMessage("Together the files are " + bytes(total) + ", over this server's limit of " +
          bytes(limits.request) + " per request; send them in smaller groups.");
      }
      const body = new FormData();
      body.append("checkpoint", select.value);
      body.append("heatmaps", $("heatmaps").checked ? "true" : "false");
      for (const f of files) body.append("file", f, f.name);
      button.disabled = true;
      status.textContent = "Predicting " + files.length + (files.length === 1 ? " file" : " files") + "…";
      try {
        const data = await api("/api/predict", { method: "POST", body: body });
        showResults(data);
        const n = (data.results || []).length, s = (data.skipped || []).length;
        status.textContent = n + (n === 1 ? " prediction" : " predictions") + (s ? ", " + s + " skipped" : "") +
          " with " + (data.model || select.value) + ".";
      } catch (err) {
        status.textContent = "";
        showError(err, "Prediction failed");
      } finally {
        button.disabled = false;
      }
    });

    function probabilityList(result, highlight) {
      const probs = result.probabilities || {};
      const names = Object.keys(probs);
      if (!names.length) return el("span", { className: "muted", text: "–" });
      return el("ul", { className: "probs" }, names.map((name) => {
        const p = Number(probs[name]);
        return el("li", { className: highlight(name) ? "best" : null }, [
          el("span", { className: "name", text: name }),
          el("meter", { min: 0, max: 1, value: Number.isFinite(p) ? p : 0 }),
          el("span", { className: "p", text: fmt(p) }),
        ]);
      }));
    }

    function showResults(data) {
      const task = data.task, body = $("results-table").querySelector("tbody"), results = data.results || [];
      clear(body);
      const head = $("results-table").querySelector("thead tr");
      head.lastElementChild.textContent = task === "regression" ? "Values" : "Probabilities";
      for (const r of results) {
        let prediction, detail;
        if (task === "regression" || (r.values && !r.probabilities)) {
          const values = r.values || {};
          prediction = el("span", { text: Object.keys(values).map((k) => k + " " + fmt(values[k])).join(", ") || "–" });
          detail = el("dl", { className: "metrics" },
            Object.keys(values).flatMap((k) => [el("dt", { text: k }), el("dd", { text: fmt(values[k]) })]));
        } else if (Array.isArray(r.prediction)) {  // multi-label: the labels above their thresholds
          const labels = new Set(r.prediction);
          prediction = el("span", { className: "label", text: r.prediction.length ? r.prediction.join(", ") : "none" });
          detail = probabilityList(r, (name) => labels.has(name));
        } else {
          prediction = el("span", { className: "label", text: fmt(r.prediction) });
          const probs = r.probabilities || {};
          const top = Object.keys(probs).reduce((a, b) => (a === null || probs[b] > probs[a] ? b : a), null);
          detail = probabilityList(r, (name) => name === top);
        }
        const overlay = r.overlay
          ? el("img", { src: r.overlay, alt: "Heatmap overlay of " + r.filename, className: "overlay",
            title: "Click to enlarge", onclick: (event) => event.currentTarget.classList.toggle("large") })
          : el("span", { className: "muted", text: "no overlay" });
        body.append(el("tr", {}, [el("td", { className: "overlay-cell" }, overlay),
          el("td", { className: "filename", text: r.filename }), el("td", {}, prediction), el("td", {}, detail)]));
      }
      const skipped = data.skipped || [], list = $("skipped-list");
      clear(list);
      for (const s of skipped) list.append(el("li", {}, [el("strong", { text: s.filename }), " — " + s.reason]));
      $("skipped").hidden = !skipped.length;
      $("results-table").hidden = !results.length;
      const link = $("download-csv");
      if (csvUrl) URL.revokeObjectURL(csvUrl);
      csvUrl = results.length ? URL.createObjectURL(new Blob([toCsv(data)], { type: "text/csv" })) : null;
      link.hidden = !csvUrl;
      link.href = csvUrl || "#";
      $("results").hidden = false;
    }
  }

  // The CSV is built here from the JSON the page already has: no second upload and no second inference.
  function csvCell(value) {
    let text = value === null || value === undefined ? "" : String(value);
    // A cell starting with = + - @ would be a formula to a spreadsheet (a file name can be anything).
    if (/^[=+\-@\t\r]/.test(text) && !/^-?\d/.test(text)) text = "'" + text;
    return /[",\n\r]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function toCsv(data) {
    const results = data.results || [];
    const regression = data.task === "regression";
    const names = [];
    for (const r of results) {
      for (const k of Object.keys((regression ? r.values : r.probabilities) || {})) if (!names.includes(k)) names.push(k);
    }
    const header = ["filename"].concat(regression ? names : ["prediction"].concat(names.map((n) => "p_" + n)));
    const lines = [header.map(csvCell).join(",")];
    for (const r of results) {
      const row = [r.filename];
      if (regression) {
        for (const n of names) row.push((r.values || {})[n]);
      } else {
        row.push(Array.isArray(r.prediction) ? r.prediction.join(";") : r.prediction);
        for (const n of names) row.push((r.probabilities || {})[n]);
      }
      lines.push(row.map(csvCell).join(","));
    }
    return lines.join("\r\n") + "\r\n";
  }

  // ---- Runs ------------------------------------------------------------------------------------------------

  async function runsPage() {
    const status = $("runs-status"), table = $("runs-table"), body = table.querySelector("tbody");
    const button = $("compare-button"), choice = $("compare-choice");
    const picked = [];  // in the order ticked: the first is compare's reference

    function update() {
      button.disabled = picked.length < 2;
      choice.textContent = picked.length ? "reference: " + picked[0] + (picked.length > 1 ? "; compared: " +
        picked.slice(1).join(", ") : " (tick one more)") : "";
    }

    let data;
    try {
      data = await api("/api/runs");
    } catch (err) {
      status.textContent = "";
      showError(err, "Could not list the runs");
      return;
    }
    const runs = data.runs || [];
    if (!runs.length) {
      status.textContent = "No runs under the runs folder yet: start a fine-tune on the Jobs page.";
      return;
    }
    status.textContent = runs.length + (runs.length === 1 ? " run" : " runs");
    for (const run of runs) {
      const box = el("input", { type: "checkbox", value: run.id, "aria-label": "Compare " + run.id });
      box.addEventListener("change", () => {
        const at = picked.indexOf(run.id);
        if (box.checked && at < 0) picked.push(run.id);
        if (!box.checked && at >= 0) picked.splice(at, 1);
        update();
      });
      const links = [];
      if (run.report) links.push(el("a", { href: run.report, target: "_blank", rel: "noopener", className: "report",
        text: "report" }));
      if (run.checkpoint) {
        links.push(" ", el("a", { href: "/predict?model=" + encodeURIComponent(run.checkpoint), text: "predict" }));
      }
      body.append(el("tr", {}, [
        el("td", {}, box),
        el("td", {}, el("code", { text: run.id })),
        el("td", { text: run.task || "–" }),
        el("td", { text: run.model || "–" }),
        el("td", { text: run.split || "–" }),
        metricsCell(run.metrics, 6),
        el("td", {}, links.length ? links : el("span", { className: "muted", text: "none" })),
        el("td", { text: when(run.modified) }),
      ]));
    }
    table.hidden = false;
    update();

    button.addEventListener("click", async () => {
      showMessage("");
      button.disabled = true;
      const before = button.textContent;
      button.textContent = "Comparing…";
      try {
        showComparison(await api("/api/compare", { method: "POST", json: { runs: picked.slice() } }));
      } catch (err) {
        showError(err, "Could not compare");
      } finally {
        button.textContent = before;
        update();
      }
    });
  }

  // Rows of objects as a table: one column per key, in the order first seen.
  function fillTable(table, rows) {
    const head = table.querySelector("thead"), body = table.querySelector("tbody");
    clear(head);
    clear(body);
    const columns = [];
    for (const r of rows) {
      for (const k of Object.keys(r)) {
        // a column empty in every row (compare's task, with one task) is left out
        const empty = rows.every((row) => row[k] === null || row[k] === undefined || row[k] === "");
        if (!empty && !columns.includes(k)) columns.push(k);
      }
    }
    head.append(el("tr", {}, columns.map((c) => el("th", { text: c.replace(/_/g, " ") }))));
    for (const r of rows) body.append(el("tr", {}, columns.map((c) => el("td", { text: fmt(r[c]) }))));
    table.hidden = !rows.length;
  }

  function showComparison(data) {
    // compare's rows, its forest plot (a data URI), notes (warnings in words) and, across tasks, Wilcoxon.
    const rows = data.rows || data.comparisons || [];
    let plot = data.forest || null;
    if (!plot) {
      for (const v of Object.values(data)) if (typeof v === "string" && v.startsWith("data:image/")) plot = v;
    }
    fillTable($("compare-table"), rows);
    const notes = $("compare-notes");
    clear(notes);
    for (const note of data.notes || []) notes.append(el("li", { text: note }));
    notes.hidden = !notes.childElementCount;
    const wilcoxon = Array.isArray(data.wilcoxon) ? data.wilcoxon : [];
    fillTable($("wilcoxon-table"), wilcoxon);
    $("wilcoxon-head").hidden = !wilcoxon.length;
    const img = $("forest-plot");
    img.hidden = !plot;
    if (plot) img.src = plot;
    $("comparison").hidden = false;
  }

  // ---- Jobs ------------------------------------------------------------------------------------------------

  const ACTIVE = ["queued", "running"];

  function jobsPage() {
    const verbSelect = $("verb"), fields = $("job-fields"), form = $("job-form"), start = $("start-button");
    let forms = {};
    let selected = null;  // the job shown in the detail panel
    let timer = null;

    // A fresh suggested name (verb-date-time) until the user types one: names must be new under --runs.
    function buildName(verb) {
      const name = $("job-name");
      if (!name.value || name.dataset.suggested === name.value) {
        const stamp = new Date().toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 15);
        name.value = name.dataset.suggested = verb + "-" + stamp;
      }
    }

    function buildForm(verb) {
      clear(fields);
      buildName(verb);
      for (const f of forms[verb] || []) {
        if (f.name === "out" || f.name === "name") continue;  // the Name field above
        const id = "field-" + f.name;
        const hasDefault = f.default !== null && f.default !== undefined && f.default !== "";
        let input;
        if (f.type === "bool") {
          input = el("input", { id: id, name: f.name, type: "checkbox", checked: Boolean(f.default) });
        } else if (f.type === "choice" || (Array.isArray(f.choices) && f.choices.length)) {
          input = el("select", { id: id, name: f.name });
          if (!hasDefault) input.append(el("option", { value: "", text: "(default)" }));
          for (const c of f.choices || []) input.append(el("option", { value: c, text: c, selected: c === f.default }));
        } else {
          const number = f.type === "int" || f.type === "float";
          input = el("input", {
            id: id, name: f.name, type: number ? "number" : "text",
            step: f.type === "int" ? "1" : f.type === "float" ? "any" : null,
            min: number && Array.isArray(f.bounds) && f.bounds[0] !== null ? f.bounds[0] : null,
            max: number && Array.isArray(f.bounds) && f.bounds[1] !== null ? f.bounds[1] : null,
            value: !hasDefault ? null : Array.isArray(f.default) ? f.default.join(",") : f.default,
            placeholder: f.root === "data" ? "relative to the data folder" : f.root === "runs"
              ? "a model id (relative to the runs folder)" : !hasDefault ? (f.required ? "required" : "default") : null,
            required: Boolean(f.required),
          });
          if (f.type === "path") input.classList.add("path");
        }
        input.dataset.type = f.type;
        const label = el("label", { for: id }, [f.name, f.required ? el("span", { className: "required", text: " *" }) : null]);
        const flag = f.flag ? el("code", { className: "flag", text: f.flag }) : null;
        const help = el("p", { className: "help" }, [f.help || "", hasDefault && f.type !== "bool"
          ? " (default: " + (Array.isArray(f.default) ? f.default.join(",") : f.default) + ")" : ""]);
        fields.append(el("div", { className: "field" + (f.type === "bool" ? " bool" : "") },
          f.type === "bool" ? [el("label", { for: id, className: "check" }, [input, " " + f.name]), flag, help]
            : [label, flag, input, help]));
      }
    }

    // The settings the form says, typed; fields left at their default are not sent (the server has them).
    function collect(verb) {
      const settings = {}, problems = [];
      const name = $("job-name").value.trim();
      if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$/.test(name)) {
        problems.push("Name: 1 to 80 letters, digits, '.', '_' or '-', starting with a letter or digit");
      }
      for (const f of forms[verb] || []) {
        if (f.name === "out") settings.out = name;  // a form that asks for out: the same name
        const input = $("field-" + f.name);
        if (!input) continue;
        let value;
        if (f.type === "bool") {
          value = input.checked;
        } else {
          const text = input.value.trim();
          if (text === "") {
            if (f.required) problems.push(f.name + " is required");
            continue;
          }
          if (f.type === "int") {
            value = Number(text);
            if (!Number.isInteger(value)) problems.push(f.name + " must be a whole number, not " + JSON.stringify(text));
          } else if (f.type === "float") {
            value = Number(text);
            if (!Number.isFinite(value)) problems.push(f.name + " must be a number, not " + JSON.stringify(text));
          } else {
            value = text;
          }
        }
        const def = Array.isArray(f.default) ? f.default.join(",") : f.default;
        if (value === def && !f.required) continue;
        settings[f.name] = value;
      }
      return { name, settings, problems };
    }

    // The field a refusal names ({"detail", "setting"}), marked until the next try.
    function markInvalid(setting) {
      for (const node of document.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
      if (!setting) return;
      const input = setting === "name" || setting === "out" ? $("job-name") : $("field-" + setting);
      if (!input) return;
      input.closest(".field").classList.add("invalid");
      input.focus();
    }

    verbSelect.addEventListener("change", () => buildForm(verbSelect.value));

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      showMessage("");
      const verb = verbSelect.value;
      if (!verb) return showMessage("Choose a command first.");
      const { name, settings, problems } = collect(verb);
      markInvalid(null);
      if (problems.length) return showMessage(problems.join("; ") + ".");
      start.disabled = true;
      try {
        const job = await api("/api/jobs", { method: "POST", json: { verb: verb, name: name, settings: settings } });
        showMessage("Job " + job.id + " (" + name + ") queued.", "info");
        selected = job.id;
        const field = $("job-name");
        field.value = "";
        buildName(verb);
        await refresh();
      } catch (err) {
        showError(err, "Could not start the job");
        markInvalid(err.body && err.body.setting);
      } finally {
        start.disabled = false;
      }
    });

    $("cancel-button").addEventListener("click", async () => {
      if (!selected) return;
      $("cancel-button").disabled = true;
      try {
        await api("/api/jobs/" + encodeURIComponent(selected) + "/cancel", { method: "POST" });
        await refresh();
      } catch (err) {
        showError(err, "Could not cancel job " + selected);
      } finally {
        $("cancel-button").disabled = false;
      }
    });

    function showJobs(jobs) {
      const table = $("jobs-table"), body = table.querySelector("tbody"), status = $("jobs-status");
      clear(body);
      status.textContent = jobs.length ? "" : "No jobs yet.";
      for (const job of jobs) {
        const row = el("tr", { className: job.id === selected ? "selected" : null, tabindex: 0,
          "data-job": job.id }, [
          el("td", {}, el("code", { text: job.id })),
          el("td", { text: job.verb }),
          el("td", {}, el("span", { className: "badge " + job.status, text: job.status })),
          el("td", {}, job.out || job.name ? el("code", { text: job.out || job.name }) : "–"),
          el("td", { text: when(job.created) }),
        ]);
        const pick = () => {
          selected = job.id;
          refresh();
        };
        row.addEventListener("click", pick);
        row.addEventListener("keydown", (event) => {
          if (event.key === "Enter") pick();
        });
        body.append(row);
      }
      table.hidden = !jobs.length;
    }

    function showJob(job) {
      $("job-detail").hidden = false;
      $("detail-id").textContent = job.id;
      const badge = $("detail-status");
      badge.textContent = job.status;
      badge.className = "badge " + job.status;
      const out = $("detail-out");
      clear(out);
      if (job.out) {
        out.append("Run folder: ", el("code", { text: job.out }));
        if (job.status === "done") out.append(" · ", el("a", { href: "/runs", text: "see it on the Runs page" }));
      }
      const times = [["created", job.created], ["started", job.started], ["finished", job.finished]]
        .filter(([, t]) => t).map(([k, t]) => k + " " + when(t)).join(" · ");
      if (times) out.append(el("span", { className: "muted", text: (job.out ? " · " : "") + times }));

      const reason = $("detail-reason");
      reason.textContent = job.reason || "";
      reason.hidden = !job.reason;
      const commands = $("detail-commands");  // what ran, to copy and run by hand
      commands.textContent = (job.commands || []).map((c) => "$ " + c).join("\n");
      commands.hidden = !commands.textContent;
      const progress = job.progress, box = $("detail-progress"), dl = $("detail-metrics");
      clear(box);
      clear(dl);
      if (progress && progress.epochs) {
        const epoch = Number(progress.epoch) || 0;
        box.append(el("label", { for: "job-progress", text: "epoch " + epoch + " / " + progress.epochs }),
          el("progress", { id: "job-progress", max: progress.epochs, value: Math.min(epoch, progress.epochs) }));
      }
      if (progress) {
        // The losses and the headline validation metrics in view; per-class ones folded away.
        const names = Object.keys(progress).filter((k) => k !== "epoch" && k !== "epochs" &&
          (typeof progress[k] === "number" || typeof progress[k] === "string"));
        const rank = (k) => (k === "train_loss" ? -2 : k === "val_loss" ? -1
          : HEADLINE.includes(k.replace(/^val_/, "")) ? HEADLINE.indexOf(k.replace(/^val_/, "")) : 999);
        names.sort((a, b) => rank(a) - rank(b));
        const shown = names.filter((k) => rank(k) < 999), rest = names.filter((k) => rank(k) >= 999);
        const pair = (k) => [el("dt", { text: k.replace(/_/g, " ") }), el("dd", { text: fmt(progress[k], 4) })];
        for (const k of shown) dl.append(...pair(k));
        // Filled in place, so a poll does not fold what the user opened.
        const more = $("detail-more"), moreList = more.querySelector("dl");
        clear(moreList);
        for (const k of rest) moreList.append(...pair(k));
        more.querySelector("summary").textContent = rest.length + " more metrics";
        more.hidden = !rest.length;
      } else {
        $("detail-more").hidden = true;
      }
      const log = $("detail-log"), atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent = job.log_tail || "(nothing logged yet)";
      if (atBottom) log.scrollTop = log.scrollHeight;  // follow the log unless the user scrolled up
      $("cancel-button").hidden = !ACTIVE.includes(job.status);
      if (job.status === "failed") {
        showMessage("Job " + job.id + " failed" + (job.reason ? ": " + job.reason : "") + "; its log is below.",
          "error");
      }
    }

    // One poll every ~2 s while anything is queued or running (or a job is shown that is), none otherwise.
    async function refresh() {
      clearTimeout(timer);
      let active = false;
      try {
        const data = await api("/api/jobs");
        const jobs = data.jobs || [];
        showJobs(jobs);
        active = jobs.some((j) => ACTIVE.includes(j.status));
        if (selected) {
          const job = await api("/api/jobs/" + encodeURIComponent(selected));
          showJob(job);
          active = active || ACTIVE.includes(job.status);
        }
      } catch (err) {
        showError(err, "Could not read the jobs");
        active = true;  // keep trying: the server may be busy or restarting
      }
      if (active) timer = setTimeout(refresh, 2000);
    }

    (async () => {
      try {
        forms = await api("/api/forms");
        clear(verbSelect);
        for (const verb of Object.keys(forms)) verbSelect.append(el("option", { value: verb, text: verb }));
        const wanted = new URLSearchParams(window.location.search).get("verb");
        if (wanted && forms[wanted]) verbSelect.value = wanted;
        buildForm(verbSelect.value);
      } catch (err) {
        clear(verbSelect);
        verbSelect.append(el("option", { value: "", text: "Forms unavailable" }));
        showError(err, "Could not load the job forms");
      }
    })();
    refresh();
  }

  // ---- start -----------------------------------------------------------------------------------------------

  function start() {
    const main = $("page");
    if (!main) return;
    const page = main.dataset.page;
    if (page === "models") modelsPage();
    else if (page === "predict") predictPage(main);
    else if (page === "runs") runsPage();
    else if (page === "jobs") jobsPage();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
