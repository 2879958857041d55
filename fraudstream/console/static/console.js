// Live alerts on the queue page: server-sent events from /events, each new alert added on top of the table,
// each alert that got a verdict (from anyone) taken out.
(function () {
  var status = document.getElementById("live-status");
  var body = document.querySelector("#queue tbody");
  if (!status || !body || !window.EventSource) return;
  var source = new EventSource("/events");
  source.onopen = function () { status.textContent = "Live: new alerts appear on top as they are routed."; };
  source.onerror = function () { status.textContent = "Live: connection lost, retrying…"; };
  var table = document.getElementById("queue");
  var missed = 0;
  source.addEventListener("alert", function (event) {
    var a = JSON.parse(event.data);
    if (table.dataset.live !== "top") {  // a filtered or later page: say so rather than mix rows in
      missed += 1;
      status.textContent = "Live: " + missed + " new alert" + (missed > 1 ? "s" : "") + " since this page was loaded (reload to see where they fall).";
      return;
    }
    var empty = body.querySelector("tr.empty");
    if (empty) empty.remove();
    var row = document.createElement("tr");
    row.className = "live";
    row.dataset.transaction = a.transaction_id;
    var cells = [null, a.score, null, a.card_id, a.merchant_id, a.rules, a.detected_at];
    cells.forEach(function (text, i) {
      var cell = document.createElement("td");
      if (i === 0) {
        var band = document.createElement("span");
        band.className = "band " + a.band;
        band.textContent = a.band;
        cell.appendChild(band);
      } else if (i === 2) {
        var link = document.createElement("a");
        link.href = "/alerts/" + encodeURIComponent(a.transaction_id);
        link.textContent = a.amount;
        cell.className = "num";
        cell.appendChild(link);
      } else {
        cell.textContent = text;
      }
      row.appendChild(cell);
    });
    body.insertBefore(row, body.firstChild);
  });
  source.addEventListener("verdict", function (event) {
    var done = JSON.parse(event.data);
    body.querySelectorAll("tr[data-transaction]").forEach(function (row) {
      if (row.dataset.transaction === done.transaction_id) row.remove();  // decided: no longer waiting
    });
  });
})();
