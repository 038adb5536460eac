// The query builder: range, window, time zone, group-by and filters; a
// time-series chart, the rows as a table, and the same query as CSV.
import { portalClaims, queryMeter, request } from "../api.js";
import { download, errorBox, formatNumber, fromLocalInput, h, table, toLocalInput } from "../util.js";
import { drawChart } from "./chart.js";

const WINDOWS = ["", "MINUTE", "HOUR", "DAY", "MONTH"];

// The meters this token can query, with their group-by keys where known. A portal
// token cannot list meters: it names them (allowedMeterSlugs) or the user types one.
async function knownMeters() {
  try {
    return await request("/api/v1/meters");
  } catch (error) {
    const claims = portalClaims();
    if (!claims) throw error;
    return (claims.allowed_meter_slugs || []).map((slug) => ({ slug, groupBy: {} }));
  }
}

// The API parameters the form describes.
function readForm(form) {
  const get = (name) => form.elements[name].value.trim();
  const params = {
    from: fromLocalInput(get("from")), to: fromLocalInput(get("to")),
    windowSize: get("windowSize"), windowTimeZone: get("windowTimeZone"),
    groupBy: [...form.querySelectorAll("input[name=groupBy]:checked")].map((box) => box.value),
  };
  if (form.elements.subject) {
    params.subject = get("subject").split(",").map((s) => s.trim()).filter(Boolean);
  }
  for (const input of form.querySelectorAll("input[data-filter]")) {
    if (input.value.trim()) params[`filterGroupBy[${input.dataset.filter}]`] = input.value.trim();
  }
  return params;
}

function resultTable(rows, keys) {
  return table(["Window start", "Window end", "Subject", ...keys, "Value"], rows.map((row) => [
    row.windowStart, row.windowEnd, row.subject ?? "—", ...keys.map((key) => row.groupBy[key] ?? "—"),
    h("span", { class: "value", "data-value": row.value }, formatNumber(row.value)),
  ]), { id: "q-table" });
}

export async function queryView(hashParams) {
  const claims = portalClaims();
  const meters = await knownMeters();
  const chosen = hashParams.get("meter") || meters[0]?.slug || "";
  const meter = meters.find((m) => m.slug === chosen) || { slug: chosen, groupBy: {} };
  const keys = Object.keys(meter.groupBy || {});
  const wanted = new Set(hashParams.getAll("groupBy"));
  // A portal token's rows are all its own subject: grouping by subject adds nothing.
  const groupable = (claims ? [] : ["subject"]).concat(keys);
  const dayAgo = new Date(Date.now() - 24 * 3600 * 1000);
  dayAgo.setMinutes(0, 0, 0);

  const results = h("div", { id: "q-results" });
  const meterField = meters.length
    ? h("select", { name: "meter", id: "q-meter", onchange: (e) => { location.hash = `#/query?meter=${e.target.value}`; } },
      meters.map((m) => h("option", { value: m.slug, selected: m.slug === chosen }, m.slug)))
    : h("input", { name: "meter", id: "q-meter", value: chosen, placeholder: "meter slug", required: true });
  const form = h("form", { id: "q-form", class: "query" },
    h("label", {}, "Meter", meterField),
    h("label", {}, "From", h("input", { type: "datetime-local", name: "from", id: "q-from", value: hashParams.get("from") || toLocalInput(dayAgo) })),
    h("label", {}, "To (exclusive)", h("input", { type: "datetime-local", name: "to", id: "q-to", value: hashParams.get("to") || "" })),
    h("label", {}, "Window", h("select", { name: "windowSize", id: "q-window" },
      WINDOWS.map((w) => h("option", { value: w, selected: w === (hashParams.get("windowSize") ?? "HOUR") }, w || "none (totals)")))),
    h("label", {}, "Time zone", h("input", { name: "windowTimeZone", id: "q-tz",
      value: hashParams.get("windowTimeZone") || Intl.DateTimeFormat().resolvedOptions().timeZone })),
    groupable.length ? h("fieldset", {}, h("legend", {}, "Group by"),
      groupable.map((key) => h("label", { class: "inline" },
        h("input", { type: "checkbox", name: "groupBy", value: key, checked: wanted.has(key) }), key))) : null,
    h("fieldset", {}, h("legend", {}, "Filters"),
      claims ? h("span", {}, `subject = ${claims.sub} (from the portal token)`)
        : h("label", {}, "Subjects (comma-separated)", h("input", { name: "subject", id: "q-subject", value: hashParams.getAll("subject").join(",") })),
      keys.map((key) => h("label", {}, key, h("input", { "data-filter": key, id: `q-filter-${key}` })))),
    h("div", { class: "actions" },
      h("button", { type: "submit", id: "q-run" }, "Run query"),
      h("button", { type: "button", id: "q-csv", onclick: () => csv(form) }, "Download CSV")));

  async function run() {
    const slug = form.elements.meter.value.trim();
    const params = readForm(form);
    results.replaceChildren(h("p", {}, "Running…"));
    try {
      const body = await queryMeter(slug, params);
      const rowKeys = [...new Set(body.data.flatMap((row) => Object.keys(row.groupBy)))];
      const total = body.data.reduce((sum, row) => sum + Number(row.value), 0);
      const canvas = h("canvas", { id: "q-chart", height: "110" });
      results.replaceChildren(
        h("div", { class: "chart" }, canvas),
        h("p", { class: "summary" }, `${body.data.length} rows · sum of values `,
          h("strong", { id: "q-total", "data-value": total }, formatNumber(total))),
        resultTable(body.data, rowKeys));
      drawChart(canvas, body.data, Boolean(params.windowSize));
      results.dataset.state = "done";
    } catch (error) {
      results.replaceChildren(errorBox(error));
      results.dataset.state = "error";
    }
  }

  async function csv() {
    const slug = form.elements.meter.value.trim();
    try {
      download(`${slug}.csv`, await queryMeter(slug, readForm(form), "text/csv"), "text/csv");
    } catch (error) {
      results.replaceChildren(errorBox(error));
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); run(); });
  const title = claims ? `Usage of ${claims.sub}` : "Query";
  const section = h("section", {}, h("h1", {}, title), form, results);
  if (chosen) run();
  return section;
}
