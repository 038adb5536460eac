"""The optional collector component: off by default; on, a StatefulSet whose replicas each
have their own buffer claim, with a collector.yaml valid for `pgmeter collect --config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pgmeter.config import load_collector_config


def collector_yaml(rendered) -> dict[str, Any]:
    return yaml.safe_load(rendered.get("ConfigMap", "pgmeter-collector")["data"]["collector.yaml"])


def test_off_by_default(default_render) -> None:
    assert not [d for d in default_render.docs if d["metadata"]["name"].endswith("collector")]


def test_on_one_http_pipeline_to_the_releases_api_with_the_token_from_a_secret(render, tmp_path: Path) -> None:
    rendered = render({"collector": {"enabled": True, "tokenSecret": {"name": "collect-token", "key": "t"}}})
    config = collector_yaml(rendered)
    file = tmp_path / "collector.yaml"
    file.write_text(yaml.safe_dump(config))
    loaded = load_collector_config(file)  # what `pgmeter collect --config` will read
    assert loaded.listen == "0.0.0.0:8080"
    assert str(loaded.buffer) == "/var/lib/pgmeter-collect"
    [pipeline] = loaded.pipelines
    assert (pipeline.name, pipeline.source.type) == ("http", "http")
    assert pipeline.to.url == "http://pgmeter.metering.svc:80"
    assert pipeline.to.token is None and pipeline.to.token_env is None
    assert pipeline.buffer_max_bytes == 858993459

    spec = rendered.get("StatefulSet", "pgmeter-collector")["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"] == ["collect", "--config", "/etc/pgmeter-collect/collector.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["PGMETER_COLLECT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "collect-token", "key": "t"}
    assert "PGMETER_COLLECT_AUTH_TOKENS" not in env  # no authTokensSecret: the push sources are open
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The buffer is the replica's own claim, from the template; the config a ConfigMap.
    assert mounts["/var/lib/pgmeter-collect"] not in volumes
    [claim] = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mounts["/var/lib/pgmeter-collect"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert volumes[mounts["/etc/pgmeter-collect"]]["configMap"]["name"] == "pgmeter-collector"
    assert not rendered.of_kind("PersistentVolumeClaim")
    service = rendered.get("Service", "pgmeter-collector")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "collector"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()


def test_ha_replicas_each_with_their_own_buffer_and_a_stable_name(render) -> None:
    rendered = render({"collector": {"enabled": True, "replicas": 3,
                                     "authTokensSecret": {"name": "producer-tokens", "key": "tokens.json"}}})
    statefulset = rendered.get("StatefulSet", "pgmeter-collector")
    spec = statefulset["spec"]
    assert spec["replicas"] == 3
    # Stable identity: the governing Service is headless and selects exactly these pods.
    headless = rendered.get("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    # Independent replicas; a buffer (undelivered events) outlives a scale-down and the release.
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    [claim] = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # one pod per buffer file
    [c] = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["PGMETER_COLLECT_AUTH_TOKENS"]["valueFrom"]["secretKeyRef"] == {
        "name": "producer-tokens", "key": "tokens.json"}


def test_pipelines_get_the_default_destination_unless_they_name_one(render, tmp_path: Path) -> None:
    pipelines = [
        {"name": "db", "source": {"type": "sql", "url": "postgresql://db/billing", "table": "usage",
                                  "key": "id"}, "mapping": '{type: "t", subject: .c}'},
        {"name": "elsewhere", "source": {"type": "http", "path": "/other"}, "to": {"url": "https://om.example"}},
    ]
    rendered = render({"collector": {"enabled": True, "url": "https://metering.example", "pipelines": pipelines,
                                     "storage": {"size": "5Gi", "storageClassName": "fast"}}})
    file = tmp_path / "collector.yaml"
    file.write_text(yaml.safe_dump(collector_yaml(rendered)))
    loaded = load_collector_config(file)
    assert [(p.name, p.to.url) for p in loaded.pipelines] == [("db", "https://metering.example"),
                                                              ("elsewhere", "https://om.example")]
    assert loaded.pipelines[0].source.table == "usage"
    [claim] = rendered.get("StatefulSet", "pgmeter-collector")["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast" and claim["spec"]["resources"]["requests"]["storage"] == "5Gi"


def test_otlp_grpc_ports_are_opened_where_the_producers_reach(render) -> None:
    pipelines = [{"name": "otel", "source": {"type": "otlp_logs", "grpcListen": "0.0.0.0:4317"}},
                 {"name": "http", "source": {"type": "http"}}]
    rendered = render({"networkPolicy": {"enabled": True},
                       "collector": {"enabled": True, "pipelines": pipelines, "networkPolicy": {
                           "ingress": [{"namespaceSelector": {"matchLabels": {"team": "gateway"}}}]}}})
    [c] = rendered.get("StatefulSet", "pgmeter-collector")["spec"]["template"]["spec"]["containers"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "grpc-4317", "containerPort": 4317, "protocol": "TCP"}]
    service = rendered.get("Service", "pgmeter-collector")
    assert service["spec"]["ports"][1] == {"name": "grpc-4317", "port": 4317, "targetPort": "grpc-4317",
                                           "protocol": "TCP"}
    [rule] = rendered.get("NetworkPolicy", "pgmeter-collector")["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}, {"port": "grpc-4317", "protocol": "TCP"}]


def test_a_kubernetes_source_gets_its_own_account_allowed_to_list_pods_and_no_more(render) -> None:
    scoped = render({"collector": {"enabled": True, "pipelines": [
        {"name": "pods", "source": {"type": "kubernetes", "namespaces": ["tpp-a", "tpp-b"]}}]}})
    pod = scoped.get("StatefulSet", "pgmeter-collector")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "pgmeter-collector" and pod["automountServiceAccountToken"] is True
    account = scoped.get("ServiceAccount", "pgmeter-collector")
    assert account["metadata"]["namespace"] == "metering"
    roles = scoped.of_kind("Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["tpp-a", "tpp-b"]
    assert all(r["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}] for r in roles)
    for binding in scoped.of_kind("RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pgmeter-collector",
                                        "namespace": "metering"}]
        assert binding["roleRef"]["name"] == "pgmeter-collector"
    assert not scoped.of_kind("ClusterRole")
    # No namespaces named: every namespace, by a ClusterRole.
    everywhere = render({"collector": {"enabled": True, "pipelines": [
        {"name": "pods", "source": {"type": "kubernetes"}}]}})
    [cluster_role] = everywhere.of_kind("ClusterRole")
    [binding] = everywhere.of_kind("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": cluster_role["metadata"]["name"]}
    assert not everywhere.of_kind("Role")
    # Without a kubernetes source the collector has no API access at all.
    plain = render({"collector": {"enabled": True}})
    assert plain.get("StatefulSet", "pgmeter-collector")["spec"]["template"]["spec"][
        "automountServiceAccountToken"] is False
    assert not plain.of_kind("Role") and not plain.of_kind("ClusterRole")
