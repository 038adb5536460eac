// The one way the console talks to pgmeter: the public /api/v1 routes, with the
// token the user entered (kept in sessionStorage: gone when the tab closes).

const KEY = "pgmeter.token";

export function token() {
  return sessionStorage.getItem(KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

// A portal token is a JWT issued by pgmeter (iss "openmeter"); its claims say
// which subject (TPP) and meters it may see. Nothing here trusts them: the
// server checks the signature on every request.
export function portalClaims() {
  const parts = token().split(".");
  if (parts.length !== 3) return null;
  try {
    const claims = JSON.parse(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/")));
    return claims.iss === "openmeter" && claims.sub ? claims : null;
  } catch {
    return null;
  }
}

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
  }
}

// URLSearchParams from an object; arrays become repeated keys.
export function searchParams(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params || {})) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") search.append(name, item);
    }
  }
  return search;
}

export async function request(path, { params, method = "GET", body, accept = "application/json" } = {}) {
  const headers = { Accept: accept };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const query = searchParams(params).toString();
  const response = await fetch(path + (query ? `?${query}` : ""), {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch { /* not JSON */ }
    throw new ApiError(response.status, detail);
  }
  if (response.status === 204) return null;
  return accept === "text/csv" ? response.text() : response.json();
}

// The meter query, the namespace's or (with a portal token) the portal's.
export function queryMeter(slug, params, accept) {
  const path = portalClaims()
    ? `/api/v1/portal/meters/${encodeURIComponent(slug)}/query`
    : `/api/v1/meters/${encodeURIComponent(slug)}/query`;
  return request(path, { params, accept });
}
