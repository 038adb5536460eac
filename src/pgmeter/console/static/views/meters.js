// Meters: the list, and one meter with its subjects.
import { request } from "../api.js";
import { h, table } from "../util.js";

export async function listMeters() {
  return request("/api/v1/meters");
}

export async function metersView() {
  const meters = await listMeters();
  if (!meters.length) return h("p", {}, "No meters yet: create one with POST /api/v1/meters or in the config file.");
  return h("section", {},
    h("h1", {}, "Meters"),
    table(["Meter", "Aggregation", "Event type", "Value", "Group by", ""], meters.map((m) => [
      h("a", { href: `#/meters/${encodeURIComponent(m.slug)}` }, m.slug),
      m.aggregation, m.eventType, m.valueProperty || "—", Object.keys(m.groupBy || {}).join(", ") || "—",
      h("a", { href: `#/query?meter=${encodeURIComponent(m.slug)}` }, "query"),
    ]), { id: "meters-table" }));
}

export async function meterView(slug) {
  const meter = await request(`/api/v1/meters/${encodeURIComponent(slug)}`);
  const subjects = await request(`/api/v1/meters/${encodeURIComponent(slug)}/subjects`);
  const facts = [
    ["Slug", meter.slug], ["Name", meter.name], ["Description", meter.description || "—"],
    ["Aggregation", meter.aggregation], ["Event type", meter.eventType],
    ["Value property", meter.valueProperty || "—"],
    ["Group by", Object.entries(meter.groupBy || {}).map(([k, v]) => `${k} = ${v}`).join(", ") || "—"],
    ["Created", meter.createdAt], ["Updated", meter.updatedAt],
  ];
  return h("section", {},
    h("h1", {}, meter.name || meter.slug),
    h("p", {}, h("a", { class: "button", href: `#/query?meter=${encodeURIComponent(slug)}` }, "Query this meter")),
    h("dl", {}, facts.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)])),
    h("h2", {}, `Subjects (${subjects.length})`),
    subjects.length
      ? h("ul", { class: "subjects" }, subjects.map((s) => h("li", {},
        h("a", { href: `#/query?meter=${encodeURIComponent(slug)}&subject=${encodeURIComponent(s)}&groupBy=subject` }, s))))
      : h("p", {}, "No events yet."));
}
