// Subjects (TPPs) and their usage of one meter over a range.
import { queryMeter } from "../api.js";
import { errorBox, formatNumber, fromLocalInput, h, table, toLocalInput } from "../util.js";
import { drawChart } from "./chart.js";
import { listMeters } from "./meters.js";

export async function subjectsView() {
  const meters = await listMeters();
  if (!meters.length) return h("p", {}, "No meters yet.");
  const monthAgo = new Date(Date.now() - 30 * 24 * 3600 * 1000);
  const results = h("div", { id: "s-results" });
  const form = h("form", { class: "query", id: "s-form" },
    h("label", {}, "Meter", h("select", { name: "meter", id: "s-meter" }, meters.map((m) => h("option", { value: m.slug }, m.slug)))),
    h("label", {}, "From", h("input", { type: "datetime-local", name: "from", value: toLocalInput(monthAgo) })),
    h("label", {}, "To (exclusive)", h("input", { type: "datetime-local", name: "to" })),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Show usage")));

  async function run() {
    const slug = form.elements.meter.value;
    try {
      const body = await queryMeter(slug, {
        groupBy: ["subject"], from: fromLocalInput(form.elements.from.value), to: fromLocalInput(form.elements.to.value),
      });
      const rows = [...body.data].sort((a, b) => Number(b.value) - Number(a.value));
      const canvas = h("canvas", { id: "s-chart", height: "90" });
      results.replaceChildren(h("div", { class: "chart" }, canvas),
        table(["Subject", "Usage", ""], rows.map((row) => [
          row.subject ?? "(none)", formatNumber(row.value),
          h("a", { href: `#/query?meter=${encodeURIComponent(slug)}&subject=${encodeURIComponent(row.subject ?? "")}&groupBy=subject` }, "details"),
        ]), { id: "s-table" }));
      drawChart(canvas, rows, false);
    } catch (error) {
      results.replaceChildren(errorBox(error));
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); run(); });
  run();
  return h("section", {}, h("h1", {}, "Subjects"), h("p", { class: "hint" }, "Usage per subject (TPP), largest first."), form, results);
}
