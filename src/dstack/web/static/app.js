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
