/* canary_router dashboard: polls the JSON API and draws its charts as inline SVG. No library, no CDN.
   Everything the server sends is written with textContent (never as HTML). */
(function () {
  "use strict";

  var body = document.body;
  var root = body.dataset.root || "";
  var api = root + "/api";
  var rollout = body.dataset.rollout || "";
  var pollMs = Math.max(200, (parseFloat(body.dataset.poll) || 2) * 1000);
  var csrf = body.dataset.csrf || "";
  var canAct = body.dataset.canAct === "true";
  var SVG = "http://www.w3.org/2000/svg";
  var VARIANTS = ["old", "new"];

  // ------------------------------------------------------------------ small helpers

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    var key;
    for (key in attrs || {}) {
      if (Object.prototype.hasOwnProperty.call(attrs, key)) {
        node.setAttribute(key, attrs[key]);
      }
    }
    (children || []).forEach(function (child) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    var key;
    for (key in attrs) {
      if (Object.prototype.hasOwnProperty.call(attrs, key)) {
        node.setAttribute(key, String(attrs[key]));
      }
    }
    return node;
  }

  function byId(id) {
    return document.getElementById(id);
  }

  function replaceChildren(node, children) {
    while (node.firstChild) {
      node.removeChild(node.firstChild);
    }
    children.forEach(function (child) {
      node.appendChild(child);
    });
  }

  function text(id, value) {
    var node = byId(id);
    if (node) {
      node.textContent = value;
    }
  }

  function num(value) {
    return value === null || value === undefined ? "—" : Number(value).toLocaleString("en");
  }

  function pct(value, digits) {
    if (value === null || value === undefined) {
      return "—";
    }
    return (value * 100).toFixed(digits === undefined ? 2 : digits) + " %";
  }

  function ms(seconds) {
    if (seconds === null || seconds === undefined) {
      return "—";
    }
    var m = seconds * 1000;
    return (m >= 100 ? m.toFixed(0) : m >= 10 ? m.toFixed(1) : m.toFixed(2)) + " ms";
  }

  function percentLabel(value) {
    return (Math.round(value * 100) / 100).toString() + " %";
  }

  function utc(seconds) {
    if (!seconds) {
      return "—";
    }
    return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "");
  }

  function duration(seconds) {
    if (seconds < 0 || !isFinite(seconds)) {
      return "—";
    }
    if (seconds >= 3600) {
      return (seconds / 3600).toFixed(1) + " h";
    }
    if (seconds >= 60) {
      return (seconds / 60).toFixed(1) + " min";
    }
    return Math.round(seconds) + " s";
  }

  function badge(kind, value) {
    var label = String(value || "—").replace(/_/g, " ");
    return el("span", { "class": kind + " " + kind + "-" + (value || "none") }, [label]);
  }

  function setBadge(id, kind, value) {
    var node = byId(id);
    if (node) {
      node.className = kind + " " + kind + "-" + (value || "none");
      node.textContent = String(value || "—").replace(/_/g, " ");
    }
  }

  function getJSON(path) {
    return fetch(api + path, {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (response) {
      return response.json().then(function (data) {
        if (!response.ok) {
          throw new Error(data && data.error ? data.error : "HTTP " + response.status);
        }
        return data;
      });
    });
  }

  // ------------------------------------------------------------------ overview

  function renderOverview(data) {
    var rows = data.rollouts.map(function (item) {
      var steps = item.steps.length;
      var stepText = item.step_index >= 0 ? "step " + (item.step_index + 1) + " of " + steps : "before step 1";
      var progress = el("progress", { max: "100", value: String(item.percent), "aria-label": item.name + " percent" });
      var link = el("a", { href: root + "/rollouts/" + encodeURIComponent(item.name) }, [item.name]);
      var nameCell = el("th", { scope: "row" }, [link]);
      if (item.description) {
        nameCell.appendChild(el("div", { "class": "note" }, [item.description]));
      }
      return el("tr", { "data-rollout": item.name }, [
        nameCell,
        el("td", {}, [badge("phase", item.phase)]),
        el("td", { "class": "progress-cell" }, [progress, " " + percentLabel(item.percent) + " · " + stepText]),
        el("td", { title: item.verdict.message || "" }, [badge("outcome", item.verdict.outcome)]),
        el("td", { "class": "num" }, [num(item.requests.old)]),
        el("td", { "class": "num" }, [num(item.requests["new"])]),
        el("td", {}, [utc(item.updated_at)])
      ]);
    });
    if (!rows.length) {
      rows = [el("tr", {}, [el("td", { colspan: "7" }, ["No rollouts are configured."])])];
    }
    replaceChildren(byId("rollouts-body"), rows);
  }

  // ------------------------------------------------------------------ one rollout

  function renderSteps(d) {
    var stopped = d.phase === "rolled_back";
    var items = d.steps.map(function (step, index) {
      var state = "todo";
      if (d.phase === "completed" || index < d.step_index) {
        state = "done";
      } else if (index === d.step_index) {
        state = stopped ? "stopped" : "current";
      }
      var attrs = { "class": state };
      if (state === "current" || state === "stopped") {
        attrs["aria-current"] = "step";
      }
      var label = percentLabel(step);
      var hidden = { done: " (done)", current: " (current)", stopped: " (rolled back here)", todo: "" }[state];
      return el("li", attrs, [label, el("span", { "class": "visually-hidden" }, [hidden])]);
    });
    replaceChildren(byId("steps"), items);
  }

  function stateLine(d) {
    var parts = [];
    parts.push("Serving the new version to " + percentLabel(d.percent) + " of units");
    if (d.step_index >= 0 && d.phase !== "completed") {
      parts.push("step " + (d.step_index + 1) + " of " + d.steps.length);
    }
    if (d.shadow) {
      parts.push("shadow step");
    }
    if (d.phase === "running" || d.phase === "paused") {
      parts.push("at this step for " + duration(d.now - d.step_started_at) + " (bake time " + duration(d.bake_time) + ")");
    }
    return parts.join(" · ");
  }

  function numbersRow(variant, v) {
    return el("tr", { "data-variant": variant }, [
      el("th", { scope: "row" }, [variant]),
      el("td", { "class": "num" }, [num(v.requests)]),
      el("td", { "class": "num" }, [num(v.errors)]),
      el("td", { "class": "num" }, [pct(v.error_rate)]),
      el("td", { "class": "num" }, [ms(v.p50)]),
      el("td", { "class": "num" }, [ms(v.p95)]),
      el("td", { "class": "num" }, [ms(v.p99)]),
      el("td", { "class": "num" }, [num(v.units)])
    ]);
  }

  function formatNumber(value) {
    if (typeof value === "number") {
      return Math.abs(value) >= 1000 || Number.isInteger(value) ? value.toLocaleString("en") : value.toPrecision(4);
    }
    if (value === null) {
      return "—";
    }
    if (Array.isArray(value)) {
      return "[" + value.map(formatNumber).join(", ") + "]";
    }
    if (typeof value === "object") {
      return JSON.stringify(value);
    }
    return String(value);
  }

  function checkRow(check) {
    var numbers = Object.keys(check.numbers || {}).map(function (key) {
      return el("li", {}, [key + " = " + formatNumber(check.numbers[key])]);
    });
    return el("tr", { "data-check": check.name }, [
      el("th", { scope: "row" }, [check.name]),
      el("td", {}, [badge("outcome", check.outcome)]),
      el("td", {}, [check.message]),
      el("td", {}, [el("ul", { "class": "numbers" }, numbers)])
    ]);
  }

  function auditRow(record) {
    var from = record.from_phase ? record.from_phase.replace(/_/g, " ") + " → " : "";
    var fromPct = record.from_percent === null ? "" : percentLabel(record.from_percent) + " → ";
    return el("tr", { "data-action": record.action, "data-version": String(record.version) }, [
      el("td", {}, [utc(record.time)]),
      el("td", {}, [record.actor]),
      el("td", {}, [record.action]),
      el("td", {}, [from + record.to_phase.replace(/_/g, " ")]),
      el("td", { "class": "num" }, [fromPct + percentLabel(record.to_percent)]),
      el("td", {}, [record.reason])
    ]);
  }

  function renderDetail(d) {
    setBadge("phase", "phase", d.phase);
    text("state-line", stateLine(d));
    text("state-reason", d.reason ? "Last change: " + d.reason : "");
    renderSteps(d);
    var verdict = d.verdict;
    setBadge("verdict-outcome", "outcome", verdict ? verdict.outcome : null);
    text("verdict-message", verdict ? verdict.message : d.verdict_error || "");
    replaceChildren(byId("numbers-body"), VARIANTS.map(function (variant) {
      return numbersRow(variant, d.observations[variant]);
    }));
    replaceChildren(byId("checks-body"), verdict ? verdict.checks.map(checkRow) : []);
    var g = d.guard;
    var settings = [
      "error rate: new may exceed old by " + pct(g.max_error_rate_increase),
      g.max_latency_ratio === null ? "latency check off" : "p" + g.latency_percentile + " latency: new ≤ " + g.max_latency_ratio + " × old",
      "at least " + num(g.min_requests) + " requests per version",
      "α = " + g.alpha
    ];
    text("guard-settings", "Guard: " + settings.join(" · "));
    var records = d.history.slice().reverse();
    replaceChildren(byId("audit-body"), records.map(auditRow));
  }

  // ------------------------------------------------------------------ charts

  var CHART_W = 640;
  var CHART_H = 220;
  var PAD = { left: 62, right: 12, top: 12, bottom: 28 };

  function niceMax(value) {
    if (!(value > 0)) {
      return 1;
    }
    var power = Math.pow(10, Math.floor(Math.log10(value)));
    var scaled = value / power;
    var nice = scaled <= 1 ? 1 : scaled <= 2 ? 2 : scaled <= 5 ? 5 : 10;
    return nice * power;
  }

  function drawChart(key, slots, slotSeconds, now, pick, format, describe) {
    var svg = document.querySelector('svg[data-chart="' + key + '"]');
    if (!svg) {
      return;
    }
    var desc = svgEl("desc", { id: "chart-" + key + "-desc" });
    var nodes = [desc];
    var values = [];
    slots.forEach(function (slot) {
      VARIANTS.forEach(function (variant) {
        var value = pick(slot, variant);
        if (value !== null && value !== undefined) {
          values.push(value);
        }
      });
    });
    if (!slots.length || !values.length) {
      desc.textContent = "No data yet";
      nodes.push(svgEl("text", { x: CHART_W / 2, y: CHART_H / 2, "text-anchor": "middle", "class": "empty" }));
      nodes[1].textContent = "No data yet";
      replaceChildren(svg, nodes);
      return;
    }
    var x0 = slots[0].start;
    var x1 = Math.max(slots[slots.length - 1].start + slotSeconds, now, x0 + slotSeconds);
    var yMax = niceMax(Math.max.apply(null, values));
    var plotW = CHART_W - PAD.left - PAD.right;
    var plotH = CHART_H - PAD.top - PAD.bottom;
    function sx(t) {
      return PAD.left + ((t - x0) / (x1 - x0)) * plotW;
    }
    function sy(v) {
      return PAD.top + plotH - (v / yMax) * plotH;
    }
    [0, 0.5, 1].forEach(function (fraction) {
      var y = sy(yMax * fraction);
      nodes.push(svgEl("line", { x1: PAD.left, x2: CHART_W - PAD.right, y1: y, y2: y, "class": "grid" }));
      var label = svgEl("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end", "class": "axis-label" });
      label.textContent = format(yMax * fraction);
      nodes.push(label);
    });
    var startLabel = svgEl("text", { x: PAD.left, y: CHART_H - 8, "class": "axis-label" });
    startLabel.textContent = "−" + duration(now - x0);
    var endLabel = svgEl("text", { x: CHART_W - PAD.right, y: CHART_H - 8, "text-anchor": "end", "class": "axis-label" });
    endLabel.textContent = "now";
    nodes.push(startLabel, endLabel);
    var latest = {};
    VARIANTS.forEach(function (variant) {
      var segments = [];
      var current = [];
      var points = [];
      slots.forEach(function (slot) {
        var value = pick(slot, variant);
        var t = slot.start + slotSeconds / 2;
        if (value === null || value === undefined) {
          if (current.length) {
            segments.push(current);
          }
          current = [];
          return;
        }
        latest[variant] = value;
        var x = sx(Math.min(t, x1));
        var y = sy(value);
        current.push(x.toFixed(1) + "," + y.toFixed(1));
        var point = svgEl("circle", {
          cx: x.toFixed(1),
          cy: y.toFixed(1),
          r: 3.2,
          "class": "point point-" + variant,
          "data-variant": variant,
          "data-start": slot.start,
          "data-value": value
        });
        var title = svgEl("title", {});
        title.textContent = variant + " at " + utc(slot.start) + ": " + format(value);
        point.appendChild(title);
        points.push(point);
      });
      if (current.length) {
        segments.push(current);
      }
      segments.forEach(function (segment) {
        if (segment.length > 1) {
          nodes.push(svgEl("polyline", { points: segment.join(" "), "class": "line line-" + variant, "data-variant": variant }));
        }
      });
      nodes = nodes.concat(points);
    });
    desc.textContent = describe(latest);
    replaceChildren(svg, nodes);
  }

  function renderCharts(series) {
    var slots = series.slots;
    var width = series.slot_seconds || 10;
    var now = series.now;
    text("chart-window", slots.length ? slots.length + " slots of " + duration(width) + ", latest on the right" : "");
    function latestText(name, format) {
      return function (latest) {
        return name + ", latest: " + VARIANTS.map(function (variant) {
          return variant + " " + (variant in latest ? format(latest[variant]) : "no data");
        }).join(", ");
      };
    }
    drawChart("error-rate", slots, width, now, function (slot, variant) {
      return slot.error_rate[variant];
    }, function (v) {
      return pct(v, 1);
    }, latestText("Error rate", pct));
    drawChart("p95", slots, width, now, function (slot, variant) {
      return slot.p95[variant];
    }, ms, latestText("p95 latency", ms));
    drawChart("requests", slots, width, now, function (slot, variant) {
      return slot.requests[variant] || null;
    }, function (v) {
      return Math.round(v).toLocaleString("en");
    }, latestText("Requests", num));
  }

  // ------------------------------------------------------------------ actions

  function setupActions() {
    var form = byId("actions");
    if (!form) {
      return;
    }
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      if (!canAct) {
        return;
      }
      var submitter = event.submitter;
      var action = submitter && submitter.value;
      if (!action) {
        return;
      }
      var result = byId("action-result");
      var reason = byId("reason").value;
      var buttons = form.querySelectorAll("button");
      buttons.forEach(function (button) {
        button.disabled = true;
      });
      result.className = "";
      result.textContent = action + "…";
      fetch(api + "/rollouts/" + encodeURIComponent(rollout) + "/" + action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ reason: reason })
      })
        .then(function (response) {
          return response.json().then(function (data) {
            if (!response.ok) {
              throw new Error(data && data.error ? data.error : "HTTP " + response.status);
            }
            return data;
          });
        })
        .then(function (data) {
          result.textContent = "Done: " + data.action + " by " + data.actor + " — now " + data.phase.replace(/_/g, " ") + " at " + percentLabel(data.percent) + ".";
          byId("reason").value = "";
          return refresh();
        })
        .catch(function (error) {
          result.className = "failed";
          result.textContent = "Not done: " + error.message;
        })
        .then(function () {
          buttons.forEach(function (button) {
            button.disabled = false;
          });
        });
    });
  }

  // ------------------------------------------------------------------ polling

  var timer = null;

  function refresh() {
    var work;
    if (rollout) {
      var name = encodeURIComponent(rollout);
      work = Promise.all([getJSON("/rollouts/" + name), getJSON("/rollouts/" + name + "/series")]).then(function (results) {
        renderDetail(results[0]);
        renderCharts(results[1]);
      });
    } else {
      work = getJSON("/rollouts").then(renderOverview);
    }
    return work.then(
      function () {
        text("connection", "");
        body.dataset.updated = String(Date.now());
      },
      function (error) {
        text("connection", "Could not refresh: " + error.message + " (retrying)");
      }
    );
  }

  function loop() {
    refresh().then(function () {
      timer = window.setTimeout(loop, pollMs);
    });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer !== null) {
      window.clearTimeout(timer);
      loop();
    }
  });

  setupActions();
  loop();
})();
