// Follows a run's logs over server-sent events, keeping a bounded tail in memory so a page left
// open on a chatty job does not grow without limit; search filters the kept lines.
(function () {
  "use strict";
  var MAX_LINES = 5000;

  function followLogs(section) {
    var pre = document.getElementById("log");
    var search = document.getElementById("log-search");
    var picker = document.getElementById("log-job");
    var download = document.getElementById("log-download");
    var note = document.getElementById("log-note");
    var lines = [];
    var partial = "";
    var dropped = 0;
    var source = null;
    var pending = false;

    function render() {
      pending = false;
      var term = search.value.toLowerCase();
      var shown = lines.concat(partial ? [partial] : []);
      if (term) shown = shown.filter(function (l) { return l.toLowerCase().indexOf(term) !== -1; });
      var atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = shown.join("\n");
      if (atBottom) pre.scrollTop = pre.scrollHeight;
      note.textContent = dropped ? dropped + " older lines are not shown here: download the logs for all of them." : "";
    }
    function schedule() {
      if (!pending) { pending = true; window.requestAnimationFrame(render); }
    }
    function append(text) {
      var parts = (partial + text).split("\n");
      partial = parts.pop();
      for (var i = 0; i < parts.length; i++) lines.push(parts[i]);
      if (lines.length > MAX_LINES) { dropped += lines.length - MAX_LINES; lines.splice(0, lines.length - MAX_LINES); }
      schedule();
    }
    function open() {
      if (source) source.close();
      lines = []; partial = ""; dropped = 0; schedule();
      var query = picker && picker.value ? picker.value : "replica=0&job=0";
      download.href = download.href.split("?")[0] + "?" + query;
      source = new EventSource(section.dataset.events + "?" + query);
      source.onmessage = function (e) { append(JSON.parse(e.data).text); };
      source.addEventListener("end", function () { source.close(); pre.dataset.ended = "1"; });
    }
    search.addEventListener("input", schedule);
    if (picker) picker.addEventListener("change", open);
    open();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var section = document.querySelector("section.logs[data-events]");
    if (section) followLogs(section);
  });
})();

// The chat playground: the browser calls the model's OpenAI route through the proxy, streaming.
(function () {
  "use strict";

  function bubble(log, who, text) {
    var p = document.createElement("p");
    var b = document.createElement("strong");
    b.textContent = who + ": ";
    var span = document.createElement("span");
    span.textContent = text;
    p.appendChild(b);
    p.appendChild(span);
    log.appendChild(p);
    return span;
  }

  function setUp(section) {
    var form = document.getElementById("chat-form");
    var log = document.getElementById("chat-log");
    var input = document.getElementById("chat-input");
    var token = document.getElementById("chat-token");
    var max = document.getElementById("chat-max");
    var messages = [];
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var text = input.value.trim();
      if (!text) return;
      input.value = "";
      messages.push({ role: "user", content: text });
      bubble(log, "You", text);
      var out = bubble(log, "Model", "");
      out.parentNode.setAttribute("data-role", "assistant");
      var headers = { "Content-Type": "application/json" };
      if (token && token.value) headers.Authorization = "Bearer " + token.value;
      var button = form.querySelector("button[type=submit]");
      button.disabled = true;
      fetch(section.dataset.base + "/chat/completions", {
        method: "POST",
        headers: headers,
        body: JSON.stringify({
          model: section.dataset.model, messages: messages, stream: true,
          max_tokens: Math.max(1, Math.min(2048, parseInt(max.value, 10) || 64))
        })
      }).then(function (resp) {
        if (!resp.ok) {
          return resp.text().then(function (t) { throw new Error(resp.status + " " + t.slice(0, 300)); });
        }
        var reader = resp.body.getReader();
        var decoder = new TextDecoder();
        var buffer = "";
        function pump() {
          return reader.read().then(function (chunk) {
            if (chunk.done) return;
            buffer += decoder.decode(chunk.value, { stream: true });
            var events = buffer.split("\n");
            buffer = events.pop();
            var finished = false;
            events.forEach(function (line) {
              if (line.indexOf("data:") !== 0) return;
              var data = line.slice(5).trim();
              if (data === "[DONE]") { finished = true; return; }
              if (!data) return;
              var delta = ((JSON.parse(data).choices || [])[0] || {}).delta || {};
              if (delta.content) out.textContent += delta.content;
            });
            // [DONE] ends the answer, whenever the connection itself closes
            if (finished) { reader.cancel(); return; }
            return pump();
          });
        }
        return pump();
      }).then(function () {
        messages.push({ role: "assistant", content: out.textContent });
        out.parentNode.setAttribute("data-done", "1");
      }).catch(function (err) {
        messages.pop();
        out.textContent = "(error: " + err.message + ")";
        out.parentNode.setAttribute("data-done", "1");
      }).finally(function () { button.disabled = false; });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var section = document.querySelector("section.chat[data-base]");
    if (section) setUp(section);
  });
})();

// Charts (uPlot): each refresh of the run's summary carries its numbers in data-metrics; the page
// keeps the last 10 minutes of them and plots each one.
(function () {
  "use strict";
  var KEEP = 300;

  function setUp(box) {
    var defs = JSON.parse(box.dataset.charts);
    var times = [];
    var values = {};
    var plots = [];
    defs.forEach(function (def) {
      var key = def[0], title = def[1];
      values[key] = [];
      var figure = document.createElement("figure");
      figure.setAttribute("role", "img");
      figure.setAttribute("aria-label", title + " over time");
      figure.dataset.key = key;
      box.appendChild(figure);
      var opts = {
        title: title,
        width: Math.max(260, Math.min(560, box.clientWidth - 8)),
        height: 150,
        legend: { show: false },
        series: [{}, { label: title, stroke: "#2251c5", fill: "rgba(34,81,197,0.08)", spanGaps: true }],
        scales: { y: { range: function (u, min, max) { return [0, Math.max(1, max * 1.15)]; } } }
      };
      plots.push({ key: key, plot: new uPlot(opts, [times, values[key]], figure), figure: figure });
    });

    function sample() {
      var body = document.getElementById("summary-body");
      if (!body || !body.dataset.metrics) return;
      var m = JSON.parse(body.dataset.metrics);
      times.push(Date.now() / 1000);
      defs.forEach(function (def) {
        var v = m[def[0]];
        values[def[0]].push(v === undefined ? null : v);
      });
      if (times.length > KEEP) {
        times.splice(0, times.length - KEEP);
        defs.forEach(function (def) { values[def[0]].splice(0, values[def[0]].length - KEEP); });
      }
      plots.forEach(function (p) {
        p.plot.setData([times, values[p.key]]);
        var last = values[p.key][values[p.key].length - 1];
        p.figure.dataset.last = last === null ? "" : String(last);
        p.figure.dataset.points = String(times.length);
      });
    }
    sample();
    document.body.addEventListener("htmx:afterSettle", function (e) {
      var path = e.detail && e.detail.pathInfo ? e.detail.pathInfo.requestPath || "" : "";
      if (/\/summary$/.test(path)) sample();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.querySelector(".charts[data-charts]");
    if (box && window.uPlot) setUp(box);
  });
})();
