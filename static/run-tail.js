// The run page's live log tail (issue #17): follows #run-log's data-tail (/runs/{id}/tail,
// server-rendered HTML lines over SSE) with a plain EventSource. It keeps the log scrolled
// to its end unless the reader scrolled up (then "Jump to end" shows), swaps the status
// badge, and stops at `end`. A reconnect resumes after the last line (Last-Event-ID); one
// after the end gets 204 from the server, which stops EventSource for good.
(function () {
  'use strict';
  var box = document.getElementById('run-log');
  if (!box || !box.dataset.tail || !window.EventSource) return;
  var log = document.getElementById('log-lines');
  var jump = document.getElementById('log-jump');
  var state = document.getElementById('log-state');
  var badge = document.getElementById('run-status');
  var SLACK = 24; // px from the bottom that still counts as "at the end"

  function atEnd() {
    return log.scrollHeight - log.scrollTop - log.clientHeight <= SLACK;
  }
  function toEnd() {
    log.scrollTop = log.scrollHeight;
    jump.hidden = true;
  }

  log.addEventListener('scroll', function () { jump.hidden = atEnd(); });
  jump.addEventListener('click', function (event) {
    event.preventDefault();
    toEnd();
  });
  toEnd();

  var source = new EventSource(box.dataset.tail);
  state.textContent = 'Following live…';
  source.addEventListener('lines', function (event) {
    var following = log.hidden || atEnd();
    var empty = document.getElementById('log-empty');
    if (empty) empty.remove();
    log.hidden = false;
    log.insertAdjacentHTML('beforeend', event.data);
    if (following) toEnd(); else jump.hidden = false;
  });
  source.addEventListener('status', function (event) {
    badge.innerHTML = event.data;
  });
  source.addEventListener('end', function (event) {
    source.close();
    badge.innerHTML = event.data;
    var cancel = document.getElementById('run-cancel');
    if (cancel) cancel.hidden = true;
    state.textContent = 'The run is over. ';
    var reload = document.createElement('a');
    reload.href = window.location.pathname;
    reload.textContent = 'Reload for its exit code and timing';
    state.appendChild(reload);
  });
  source.addEventListener('error', function () {
    state.textContent = source.readyState === EventSource.CLOSED
      ? 'Not following (reload to try again).' : 'Reconnecting…';
  });
  source.addEventListener('open', function () { state.textContent = 'Following live…'; });
})();
