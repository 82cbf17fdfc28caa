// The runs list's live statuses (issue #17): follows #runs-table's data-follow
// (/runs/statuses?ids=..., one SSE stream for the page's unfinished runs) with a plain
// EventSource, and swaps each run's status cell for the server-rendered one it sends. The
// stream ends with `end` once every shown run is over. htmx swaps the table when a filter
// or a page changes: the stream follows the new table's runs.
(function () {
  'use strict';
  if (!window.EventSource) return;
  var source = null;
  var followed = null; // the #runs-table element the stream is for

  function follow() {
    if (source) source.close();
    source = null;
    var table = followed = document.getElementById('runs-table');
    var state = document.getElementById('runs-live');
    if (!table || !table.dataset.follow) return;
    source = new EventSource(table.dataset.follow);
    state.textContent = 'Statuses update live.';
    source.addEventListener('status', function (event) {
      var template = document.createElement('template');
      template.innerHTML = event.data.trim();
      var cell = template.content.firstElementChild;
      var shown = cell && document.getElementById(cell.id);
      if (shown) shown.replaceWith(cell);
    });
    source.addEventListener('end', function () {
      source.close();
      state.textContent = 'Every run shown is over.';
    });
    source.addEventListener('error', function () {
      if (source.readyState === EventSource.CLOSED) state.textContent = 'Statuses no longer update (reload to try again).';
    });
  }

  follow();
  ['htmx:afterSettle', 'htmx:historyRestore'].forEach(function (name) {
    document.body.addEventListener(name, function () {
      if (document.getElementById('runs-table') !== followed) follow();
    });
  });
})();
