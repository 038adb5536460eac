"""The optional collector component: off by default; on, a Deployment with a PVC for its
buffer whose collector.yaml is valid for `pgmeter collect --config`."""

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

    deployment = rendered.get("Deployment", "pgmeter-collector")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"] == ["collect", "--config", "/etc/pgmeter-collect/collector.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["PGMETER_COLLECT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "collect-token", "key": "t"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/var/lib/pgmeter-collect"]]["persistentVolumeClaim"] == {"claimName": "pgmeter-collector"}
    assert volumes[mounts["/etc/pgmeter-collect"]]["configMap"]["name"] == "pgmeter-collector"
    pvc = rendered.get("PersistentVolumeClaim", "pgmeter-collector")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    service = rendered.get("Service", "pgmeter-collector")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "collector"


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
    pvc = rendered.get("PersistentVolumeClaim", "pgmeter-collector")
    assert pvc["spec"]["storageClassName"] == "fast" and pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
