// Runs right after the CDN's <script> for htmx: when it did not arrive (offline, blocked,
// an SRI mismatch), write the pinned local copy in its place, with the same SRI hash.
(function () {
  'use strict';
  if (window.htmx) return;
  var cdn = document.currentScript.previousElementSibling;
  document.write('<script src="' + cdn.dataset.local + '" integrity="' + cdn.integrity +
    '"><\/script>');
})();
