// The API reference: /api/v1/openapi.json rendered by the vendored RapiDoc,
// loaded only when this screen is opened (it is the one large file).
import { h } from "../util.js";

let loading = null;

export async function referenceView() {
  loading ??= new Promise((resolve, reject) => {
    const script = h("script", { type: "module", src: "/console/vendor/rapidoc-min.js" });
    script.addEventListener("load", resolve);
    script.addEventListener("error", () => reject(new Error("could not load the API reference renderer")));
    document.head.append(script);
  });
  await loading;
  // System fonts, and load-fonts="false": RapiDoc otherwise fetches Open Sans from a
  // font CDN (the browser test checks that nothing leaves pgmeter).
  return h("rapi-doc", {
    id: "reference", "spec-url": "/api/v1/openapi.json", "render-style": "view", "show-header": "false",
    "allow-try": "false", "allow-authentication": "false", "load-fonts": "false", theme: "light",
    "regular-font": "system-ui, -apple-system, 'Segoe UI', sans-serif", "mono-font": "ui-monospace, monospace",
    "primary-color": "#2563eb", style: "height: calc(100vh - 80px); width: 100%;",
  });
}
