// The console's shell: token form, navigation and a hash router (#/view?params).
import { portalClaims, setToken, token } from "./api.js";
import { errorBox } from "./util.js";
import { eventsView } from "./views/events.js";
import { meterView, metersView } from "./views/meters.js";
import { portalView } from "./views/portal.js";
import { queryView } from "./views/query.js";
import { referenceView } from "./views/reference.js";
import { subjectsView } from "./views/subjects.js";

const VIEWS = {
  meters: (rest, params) => (rest ? meterView(decodeURIComponent(rest)) : metersView()),
  query: (rest, params) => queryView(params),
  subjects: () => subjectsView(),
  events: (rest, params) => eventsView(params),
  portal: () => portalView(),
  api: () => referenceView(),
};

function route() {
  const [path, search = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [name, ...rest] = path.split("/");
  const params = new URLSearchParams(search);
  // A portal token (a TPP) has exactly one screen: its own usage.
  if (portalClaims()) return { name: "query", render: () => queryView(params) };
  const view = VIEWS[name] ? name : "meters";
  return { name: view, render: () => VIEWS[view](rest.join("/"), params) };
}

async function render() {
  const main = document.getElementById("view");
  const { name, render: build } = route();
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === `#/${name}`);
  }
  try {
    main.replaceChildren(await build());
  } catch (error) {
    main.replaceChildren(errorBox(error));
  }
}

function showIdentity() {
  const claims = portalClaims();
  document.body.classList.toggle("portal", Boolean(claims));
  document.getElementById("identity").textContent = claims
    ? `TPP ${claims.sub}` : token() ? "namespace token" : "no token";
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  setToken(input.value.trim());
  input.value = "";
  showIdentity();
  render();
});
document.getElementById("forget").addEventListener("click", () => {
  setToken("");
  showIdentity();
  render();
});
window.addEventListener("hashchange", render);
showIdentity();
render();
