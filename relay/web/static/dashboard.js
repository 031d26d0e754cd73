// Draws the dashboard's chart from the numbers the server put in #activity-data.
// Without JavaScript the same numbers are in the table under the chart.
(function () {
  "use strict";
  var canvas = document.getElementById("activity-chart");
  var source = document.getElementById("activity-data");
  if (!canvas || !source || !window.Chart) {
    return;
  }
  var data = JSON.parse(source.textContent);
  new window.Chart(canvas, {
    type: "bar",
    data: {
      labels: data.labels,
      datasets: data.series.map(function (s) {
        return { label: s.label, data: s.counts, backgroundColor: s.color, borderColor: s.color };
      })
    },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      scales: {
        x: { ticks: { autoSkip: true, maxRotation: 0 } },
        y: { beginAtZero: true, ticks: { precision: 0 } }
      },
      plugins: { legend: { position: "bottom" } }
    }
  });
})();
