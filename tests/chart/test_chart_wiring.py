"""How the chart wires pgmeter's runtime contract: roles, DSNs, env, hooks, security."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

CNPG_API = "postgresql.cnpg.io/v1"
ROLES = ("api", "sink", "refresher")


def container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    return spec["containers"][0]


def env_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(doc)["env"]}


def secret_ref(env: dict[str, Any]) -> tuple[str, str]:
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def workloads(rendered) -> dict[str, dict[str, Any]]:
    """role -> Deployment or Job, keyed by the pgmeter subcommand it runs.

    The collector (`pgmeter collect`, its own config, no Postgres/NATS/Valkey) is not
    a role of the shared config: test_chart_collector.py covers it."""
    out = {}
    for doc in rendered.of_kind("Deployment") + rendered.of_kind("Job"):
        if container(doc)["args"][0] != "collect":
            out[container(doc)["args"][-1]] = doc
    return out


def test_each_role_runs_its_subcommand_with_the_config(all_on_render) -> None:
    found = workloads(all_on_render)
    assert set(found) == {"api", "sink", "refresher", "lago-sync", "migrate"}
    for role, doc in found.items():
        c = container(doc)
        assert c["args"] == ["--config", "/etc/pgmeter/pgmeter.yaml", role]
        assert "command" not in c  # the image ENTRYPOINT is `pgmeter`
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        cm = volumes[mounts["/etc/pgmeter"]]["configMap"]["name"]
        assert all_on_render.get("ConfigMap", cm)
        assert "emptyDir" in volumes[mounts["/tmp"]]


def test_default_dsn_is_the_cnpg_app_secret_uri(default_render) -> None:
    for role, doc in workloads(default_render).items():
        env = env_of(doc)
        assert secret_ref(env["PGMETER_POSTGRES_URL"]) == ("pgmeter-pg-app", "uri"), role
        assert "PGMETER_POSTGRES_QUERY_URL" not in env, role
        assert env["PGMETER_ADDRESS"]["value"] == "0.0.0.0:8888"
        assert env["PGMETER_NATS_URL"]["value"] == "nats://nats-jetstream.nats-system.svc.cluster.local:4222"
        if role != "migrate":
            assert env["PGMETER_VALKEY_URL"]["value"] == "redis://valkey-primary.valkey.svc:6379/0"
        assert "PGMETER_VALKEY_PASSWORD" not in env


def test_pooler_serves_only_the_api_queries(render) -> None:
    rendered = render({"postgres": {"pooler": {"enabled": True}}}, api_versions=(CNPG_API,))
    pooler = rendered.get("Pooler", "pgmeter-pg-pooler")
    assert pooler["spec"]["cluster"]["name"] == "pgmeter-pg"
    assert pooler["spec"]["pgbouncer"]["poolMode"] == "transaction"
    assert int(pooler["spec"]["pgbouncer"]["parameters"]["max_prepared_statements"]) > 0
    found = workloads(rendered)
    for role, doc in found.items():
        env = env_of(doc)
        # Everyone keeps the direct -rw DSN (advisory locks, LISTEN/NOTIFY, COPY, DDL).
        assert secret_ref(env["PGMETER_POSTGRES_URL"]) == ("pgmeter-pg-app", "uri"), role
        if role == "api":
            url = env["PGMETER_POSTGRES_QUERY_URL"]["value"]
            assert url.startswith("postgresql://$(CNPG_APP_USER):$(CNPG_APP_PASSWORD)@pgmeter-pg-pooler.metering.svc:5432/")
            names = list(env)
            # $(VAR) expansion only sees variables defined earlier in the list.
            for part in ("CNPG_APP_USER", "CNPG_APP_PASSWORD", "CNPG_APP_DBNAME"):
                assert names.index(part) < names.index("PGMETER_POSTGRES_QUERY_URL")
                assert secret_ref(env[part])[0] == "pgmeter-pg-app"
        else:
            assert "PGMETER_POSTGRES_QUERY_URL" not in env, role
            assert not any("pooler" in str(e) for e in env.values()), role


def test_existing_cluster_and_explicit_dsn_secret(render) -> None:
    existing = render({"postgres": {"cluster": {"enabled": False}, "clusterName": "shared-pg"}},
                      api_versions=(CNPG_API,))
    assert "Cluster" not in existing.kinds()
    for doc in workloads(existing).values():
        assert secret_ref(env_of(doc)["PGMETER_POSTGRES_URL"]) == ("shared-pg-app", "uri")

    dsn = render({"postgres": {"dsnSecret": {"name": "external-pg", "key": "dsn"}}})
    for doc in workloads(dsn).values():
        assert secret_ref(env_of(doc)["PGMETER_POSTGRES_URL"]) == ("external-pg", "dsn")


def test_pooler_with_an_explicit_dsn_is_refused(render) -> None:
    import helm_python
    with pytest.raises(helm_python.HelmError, match="pooler"):
        render({"postgres": {"pooler": {"enabled": True}, "dsnSecret": {"name": "external-pg"}}},
               api_versions=(CNPG_API,))


def test_cnpg_cluster_spec(render) -> None:
    cluster = render({"postgres": {"cluster": {"parameters": {"max_connections": 300},
                                               "storage": {"storageClass": "fast"}}}},
                     api_versions=(CNPG_API,)).get("Cluster", "pgmeter-pg")
    spec = cluster["spec"]
    assert spec["imageName"] == "ghcr.io/cloudnative-pg/postgresql:17-standard-trixie"
    assert spec["bootstrap"]["initdb"] == {"database": "pgmeter", "owner": "pgmeter"}
    assert spec["instances"] == 3
    assert spec["postgresql"]["parameters"] == {"max_connections": "300"}
    assert spec["storage"] == {"size": "20Gi", "storageClass": "fast"}
    assert cluster["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def hooks(rendered) -> dict[str, str]:
    return {f'{d["kind"]}/{d["metadata"]["name"]}': d["metadata"]["annotations"]["helm.sh/hook"]
            for d in rendered.docs if "helm.sh/hook" in d["metadata"].get("annotations", {})}


def test_migration_job_is_a_hook_on_the_direct_connection(default_render) -> None:
    assert hooks(default_render) == {
        "ServiceAccount/pgmeter-migrate": "pre-install,pre-upgrade",
        "ConfigMap/pgmeter-migrate-config": "pre-install,pre-upgrade",
        "Job/pgmeter-migrate": "pre-install,pre-upgrade",
        "Pod/pgmeter-test-health": "test",
    }
    job = default_render.get("Job", "pgmeter-migrate")
    weights = {d["metadata"]["name"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"])
               for d in default_render.docs if d["metadata"].get("annotations", {}).get("helm.sh/hook-weight")}
    # The hook's ServiceAccount and ConfigMap exist before the Job starts.
    assert weights["pgmeter-migrate"] > weights["pgmeter-migrate-config"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "pgmeter-migrate"
    assert job["spec"]["backoffLimit"] >= 1
    assert secret_ref(env_of(job)["PGMETER_POSTGRES_URL"]) == ("pgmeter-pg-app", "uri")


@pytest.mark.parametrize(("values", "api_versions", "phase"), [
    # The release creates the Cluster: its app Secret cannot exist pre-install.
    ({}, (CNPG_API,), "post-install,pre-upgrade"),
    # An existing Cluster: migrate before the new code starts.
    ({"postgres": {"cluster": {"enabled": False}}}, (CNPG_API,), "pre-install,pre-upgrade"),
    # The DSN Secret comes from this release's ExternalSecret.
    ({"postgres": {"dsnSecret": {"name": "pg-dsn"}}, "externalSecrets": {"enabled": True, "items": [
        {"name": "pg-dsn", "data": [{"secretKey": "uri", "remoteRef": {"key": "pgmeter/dsn"}}]}]}}, (),
     "post-install,pre-upgrade"),
    ({"postgres": {"dsnSecret": {"name": "pg-dsn"}}, "externalSecrets": {"enabled": True, "items": [
        {"name": "other", "data": [{"secretKey": "x", "remoteRef": {"key": "x"}}]}]}}, (),
     "pre-install,pre-upgrade"),
])
def test_migration_hook_phase(render, values, api_versions, phase) -> None:
    got = hooks(render(values, api_versions=api_versions))
    assert got["Job/pgmeter-migrate"] == got["ConfigMap/pgmeter-migrate-config"] == phase


def test_lago_sync(all_on_render, default_render, render) -> None:
    assert "lago-sync" not in workloads(default_render)
    found = workloads(all_on_render)
    lago = found["lago-sync"]
    assert lago["spec"]["replicas"] == 1
    assert secret_ref(env_of(lago)["PGMETER_LAGO_API_KEY"]) == ("lago-api-key", "api-key")
    assert secret_ref(env_of(lago)["PGMETER_POSTGRES_URL"]) == ("pgmeter-pg-app", "uri")
    for role in ("api", "sink", "refresher", "migrate"):
        assert "PGMETER_LAGO_API_KEY" not in env_of(found[role]), role
    # The default key Secret name follows the release.
    default_key = workloads(render({"lago": {"enabled": True}}))["lago-sync"]
    assert secret_ref(env_of(default_key)["PGMETER_LAGO_API_KEY"]) == ("pgmeter-lago", "api-key")


def test_auth_tokens_and_valkey_password_come_from_secrets(all_on_render) -> None:
    found = workloads(all_on_render)
    assert secret_ref(env_of(found["api"])["PGMETER_AUTH_TOKENS"]) == ("pgmeter-tokens", "tokens.json")
    for role in ("sink", "refresher", "lago-sync", "migrate"):
        assert "PGMETER_AUTH_TOKENS" not in env_of(found[role])
    for role, doc in found.items():
        if role == "migrate":
            # The hook must not wait for a Secret (here an ExternalSecret's) it does not need.
            assert not {"PGMETER_VALKEY_URL", "PGMETER_VALKEY_PASSWORD"} & set(env_of(doc))
        else:
            assert secret_ref(env_of(doc)["PGMETER_VALKEY_PASSWORD"]) == ("pgmeter-valkey", "valkey-password"), role


def test_valkey_can_be_disabled(render) -> None:
    rendered = render({"valkey": {"url": ""}, "networkPolicy": {"enabled": True}})
    for doc in workloads(rendered).values():
        assert not {"PGMETER_VALKEY_URL", "PGMETER_VALKEY_PASSWORD"} & set(env_of(doc))
    egress = rendered.get("NetworkPolicy", "pgmeter")["spec"]["egress"]
    assert not any(p.get("port") == 6379 for rule in egress for p in rule.get("ports", []))


def test_valkey_cluster_flag_reaches_every_role_that_uses_valkey(render, default_render) -> None:
    for doc in workloads(default_render).values():
        assert "PGMETER_VALKEY_CLUSTER" not in env_of(doc)
    for role, doc in workloads(render({"valkey": {"cluster": True}})).items():
        env = env_of(doc)
        if role == "migrate":
            assert "PGMETER_VALKEY_CLUSTER" not in env
        else:
            assert env["PGMETER_VALKEY_CLUSTER"]["value"] == "true", role


def pgmeter_yaml(rendered, name: str = "pgmeter-config") -> dict[str, Any]:
    return yaml.safe_load(rendered.get("ConfigMap", name)["data"]["pgmeter.yaml"])


def test_config_file_carries_meters_and_lago_without_secrets(default_render, all_on_render, values_yaml) -> None:
    config = pgmeter_yaml(default_render)
    assert config["namespace"] == "default"
    assert config["meters"] == values_yaml["meters"]
    assert [m["slug"] for m in config["meters"]] == ["api_calls", "api_latency"]
    assert config["lago"] == {k: v for k, v in values_yaml["lago"].items() if k != "apiKeySecret"}
    assert config["nats"] == {"replicas": 3}
    # The hook's copy is the same file.
    assert pgmeter_yaml(default_render, "pgmeter-migrate-config") == config
    assert pgmeter_yaml(all_on_render)["lago"]["enabled"] is True
    for rendered in (default_render, all_on_render):
        text = rendered.get("ConfigMap", "pgmeter-config")["data"]["pgmeter.yaml"]
        assert "apiKey" not in text and "lago-api-key" not in text and "password" not in text.lower()


def test_config_values_reach_the_file_and_roll_the_pods(render, default_render) -> None:
    meters = [{"slug": "tokens", "eventType": "llm.call", "aggregation": "SUM", "valueProperty": "$.tokens"}]
    rendered = render({"meters": meters, "namespace": "fingate", "config": {"sink": {"retentionDays": 400}}})
    config = pgmeter_yaml(rendered)
    assert config["meters"] == meters
    assert config["namespace"] == "fingate"
    assert config["sink"] == {"retentionDays": 400}
    checksum = lambda r: r.get("Deployment", "pgmeter-api")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]  # noqa: E731
    assert checksum(rendered) != checksum(default_render)


def test_pod_security(all_on_render) -> None:
    for name, spec in all_on_render.pod_specs():
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        tmp = [v for v in spec["volumes"] if "emptyDir" in v]
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] in {v["name"] for v in tmp}} == {"/tmp"}
            assert c["resources"]["requests"] and c["resources"]["limits"], name


def test_probes_and_ports(all_on_render) -> None:
    for doc in all_on_render.of_kind("Deployment") + all_on_render.of_kind("StatefulSet"):
        c = container(doc)
        port = 8080 if doc["metadata"]["name"] == "pgmeter-collector" else 8888
        assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_services_select_the_right_pods(all_on_render) -> None:
    api = all_on_render.get("Service", "pgmeter")
    metrics = all_on_render.get("Service", "pgmeter-metrics")
    assert api["spec"]["ports"][0]["targetPort"] == "http"
    assert metrics["spec"]["clusterIP"] == "None"

    def selected(selector: dict[str, str]) -> set[str]:
        return {d["metadata"]["name"] for d in all_on_render.docs
                if d["kind"] in ("Deployment", "StatefulSet", "Job")
                and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()}

    assert selected(api["spec"]["selector"]) == {"pgmeter-api"}
    assert selected(metrics["spec"]["selector"]) == {"pgmeter-api", "pgmeter-sink", "pgmeter-refresher",
                                                     "pgmeter-lago-sync", "pgmeter-collector"}
    monitor = all_on_render.get("ServiceMonitor", "pgmeter")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= api["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    for role in ROLES:
        pdb = all_on_render.get("PodDisruptionBudget", f"pgmeter-{role}")
        assert selected(pdb["spec"]["selector"]["matchLabels"]) == {f"pgmeter-{role}"}


def test_hpa_owns_the_api_replicas(all_on_render, default_render) -> None:
    hpa = all_on_render.get("HorizontalPodAutoscaler", "pgmeter-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgmeter-api"}
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert "replicas" not in all_on_render.get("Deployment", "pgmeter-api")["spec"]
    assert default_render.get("Deployment", "pgmeter-api")["spec"]["replicas"] == 2
    assert all_on_render.get("Deployment", "pgmeter-sink")["spec"]["replicas"] == 2


def test_ingress_points_at_the_api_service(all_on_render) -> None:
    ingress = all_on_render.get("Ingress", "pgmeter")
    assert ingress["spec"]["ingressClassName"] == "traefik"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "pgmeter", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"secretName": "metering-tls", "hosts": ["metering.example.org"]}]


def test_external_secret_shape(all_on_render) -> None:
    es = all_on_render.get("ExternalSecret", "pgmeter-valkey")
    assert es["apiVersion"] == "external-secrets.io/v1beta1"
    assert es["spec"]["secretStoreRef"] == {"kind": "ClusterSecretStore", "name": "vault-region1"}
    assert es["spec"]["target"]["name"] == "pgmeter-valkey"
    assert es["spec"]["data"][0]["remoteRef"]["key"] == "valkey/valkey"


def test_helm_test_pod_calls_the_health_endpoint(default_render) -> None:
    pod = default_render.get("Pod", "pgmeter-test-health")
    script = pod["spec"]["containers"][0]["args"][0]
    assert "http://pgmeter:80/api/v1/health" in script and '"ok"' in script
    assert pod["spec"]["restartPolicy"] == "Never"
