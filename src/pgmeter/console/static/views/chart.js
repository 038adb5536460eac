// The query's rows as a Chart.js chart: one line per series (subject and
// group-by values) over window starts, or one bar per series for totals.
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

function seriesName(row) {
  const parts = [row.subject, ...Object.entries(row.groupBy).map(([k, v]) => `${k}=${v}`)].filter(Boolean);
  return parts.join(" · ") || "total";
}

export function drawChart(canvas, rows, windowed) {
  const series = new Map();
  const starts = [...new Set(rows.map((row) => row.windowStart))].sort();
  for (const row of rows) {
    const name = seriesName(row);
    if (!series.has(name)) series.set(name, new Map());
    series.get(name).set(row.windowStart, Number(row.value));
  }
  const names = [...series.keys()];
  const data = windowed
    ? {
      labels: starts.map((start) => new Date(start).toLocaleString()),
      datasets: names.map((name, i) => ({
        label: name, data: starts.map((start) => series.get(name).get(start) ?? null),
        borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length], spanGaps: false, tension: 0,
      })),
    }
    : {
      labels: names,
      datasets: [{ label: "value", data: names.map((name) => [...series.get(name).values()][0]),
        backgroundColor: names.map((_, i) => COLORS[i % COLORS.length]) }],
    };
  // Only windows with data come back (OpenMeter does not zero-fill): gaps stay gaps.
  const chart = new window.Chart(canvas, {
    type: windowed ? "line" : "bar", data,
    options: { animation: false, responsive: true, scales: { y: { beginAtZero: true } }, plugins: { legend: { display: windowed && names.length <= 12 } } },
  });
  canvas.dataset.series = String(names.length);
  return chart;
}
