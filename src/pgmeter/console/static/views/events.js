// The raw events, newest first, with the validation error a meter found in each.
import { request } from "../api.js";
import { errorBox, h, table } from "../util.js";

export async function eventsView(hashParams) {
  const results = h("div", { id: "e-results" });
  const form = h("form", { class: "query", id: "e-form" },
    h("label", {}, "Subject", h("input", { name: "subject", value: hashParams.get("subject") || "" })),
    h("label", {}, "Limit", h("input", { name: "limit", type: "number", min: "1", max: "100", value: "100" })),
    h("label", { class: "inline" }, h("input", { type: "checkbox", name: "invalid" }), "only events with a validation error"),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Refresh")));

  async function run() {
    try {
      let items = await request("/api/v1/events", {
        params: { subject: form.elements.subject.value.trim(), limit: form.elements.limit.value },
      });
      if (form.elements.invalid.checked) items = items.filter((item) => item.validationError);
      results.replaceChildren(h("p", { class: "summary" }, `${items.length} events`),
        table(["Time", "Subject", "Type", "Id", "Data", "Validation error"], items.map(({ event, validationError }) => [
          event.time, event.subject, event.type, event.id,
          h("code", {}, JSON.stringify(event.data ?? null)),
          validationError ? h("span", { class: "error" }, validationError) : "",
        ]), { id: "e-table" }));
    } catch (error) {
      results.replaceChildren(errorBox(error));
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); run(); });
  run();
  return h("section", {}, h("h1", {}, "Events"), form, results);
}
