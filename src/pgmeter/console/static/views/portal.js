// Portal tokens: create one for a TPP, list them, invalidate them, or open the
// console as that TPP (it then sees its own usage only).
import { request, setToken } from "../api.js";
import { errorBox, fromLocalInput, h, table } from "../util.js";

export async function portalView() {
  const created = h("div", { id: "p-created" });
  const list = h("div", { id: "p-list" });
  const form = h("form", { class: "query", id: "p-form" },
    h("label", {}, "Subject (TPP)", h("input", { name: "subject", id: "p-subject", required: true })),
    h("label", {}, "Allowed meters (comma-separated, empty: all)", h("input", { name: "slugs", id: "p-slugs" })),
    h("label", {}, "Expires at (empty: the configured lifetime)", h("input", { type: "datetime-local", name: "expiresAt" })),
    h("div", { class: "actions" }, h("button", { type: "submit", id: "p-create" }, "Create token")));

  async function refresh() {
    try {
      const tokens = await request("/api/v1/portal/tokens", { params: { limit: 100 } });
      list.replaceChildren(table(["Subject", "Meters", "Expires", "State", ""], tokens.map((t) => [
        t.subject, (t.allowedMeterSlugs || ["all"]).join(", "), t.expiresAt, t.expired ? "expired / invalidated" : "valid",
        t.expired ? "" : h("button", { type: "button", onclick: () => invalidate(t.id) }, "Invalidate"),
      ]), { id: "p-table" }));
    } catch (error) {
      list.replaceChildren(errorBox(error));
    }
  }

  async function invalidate(id) {
    await request("/api/v1/portal/tokens/invalidate", { method: "POST", body: { id } });
    refresh();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const slugs = form.elements.slugs.value.split(",").map((s) => s.trim()).filter(Boolean);
    const body = { subject: form.elements.subject.value.trim() };
    if (slugs.length) body.allowedMeterSlugs = slugs;
    if (form.elements.expiresAt.value) body.expiresAt = fromLocalInput(form.elements.expiresAt.value);
    try {
      const token = await request("/api/v1/portal/tokens", { method: "POST", body });
      created.replaceChildren(
        h("p", {}, `Token for ${token.subject} (shown once):`),
        h("textarea", { id: "p-token", readonly: true, rows: "3" }, token.token),
        h("button", { type: "button", id: "p-open", onclick: () => { setToken(token.token); location.hash = "#/query"; location.reload(); } },
          `Open the console as ${token.subject}`));
      refresh();
    } catch (error) {
      created.replaceChildren(errorBox(error));
    }
  });
  refresh();
  return h("section", {}, h("h1", {}, "Portal tokens"),
    h("p", { class: "hint" }, "A portal token lets a TPP query its own usage (GET /api/v1/portal/meters/{slug}/query) and nothing else."),
    form, created, h("h2", {}, "Tokens"), list);
}
