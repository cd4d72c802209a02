"""The Helm chart: lint, render, Kubernetes schemas, and the rendered content."""

import base64
import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from .manifests import CHART, REPO, find, kinds, server_container
from .contract import ENV_VARS

# Every optional feature on at once (non-default values everywhere it matters).
FULL = {
    "replicaCount": 2,
    "server": {"tensorParallelSize": 2, "enforceEager": True, "allowedDomains": ["a.example", "b.example"],
               "allowedNetworks": ["10.20.0.0/16", "fd00::/8"],
               "maxAudioSeconds": 600, "extraEnv": [{"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}]},
    "auth": {"existingSecret": "team-keys", "existingSecretKey": "keys"},
    "model": {"source": "download", "path": "mdl/7b",
              "download": {"command": ["rclone", "copy", "s3:bucket/mdl/7b", "/models/mdl/7b"]}},
    "compileCache": {"type": "pvc", "pvc": {"claimName": "vllm-cache"}},
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "tls", "hosts": ["m.example"]}],
                "hosts": [{"host": "m.example", "paths": [{"path": "/", "pathType": "Prefix"}]}]},
    "networkPolicy": {"enabled": True, "restrictEgress": True,
                      "ingressFrom": [{"namespaceSelector": {"matchLabels": {"name": "gateway"}}}]},
    "autoscaling": {"enabled": True, "kind": "hpa", "minReplicas": 2, "maxReplicas": 6},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "priorityClassName": "gpu-high",
    "commonLabels": {"team": "audio"},
    "batch": {"enabled": True, "input": "sets/clotho/manifest.csv", "shards": 8, "parallelism": 4,
              "task": "asr", "lang": "zh", "maxTokens": 64, "outputDir": "runs/clotho-1",
              "data": {"claimName": "datasets"}, "output": {"claimName": "results"}},
}
KEDA = {"autoscaling": {"enabled": True, "kind": "keda", "minReplicas": 1, "maxReplicas": 5}}
# Features off: no auth, nothing optional.
MINIMAL = {"auth": {"enabled": False}, "podDisruptionBudget": {"enabled": False}, "helmTest": {"enabled": False},
           "serviceAccount": {"create": False}, "preStopSleepSeconds": 0, "tolerations": []}

BUILTIN_KINDS = {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "PodDisruptionBudget",
                 "Ingress", "NetworkPolicy", "HorizontalPodAutoscaler", "Pod", "Job"}
CRDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
        "ScaledObject": "keda.sh/v1alpha1"}


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def config(docs) -> dict:
    return find(docs, "ConfigMap", "-config")["data"]


# --- lint and schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, FULL, KEDA, MINIMAL], ids=["default", "full", "keda", "minimal"])
def test_helm_lint_strict(helm, values):
    out = helm.run("lint", "--strict", str(CHART), *helm.values_file(values))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("values", [None, FULL, KEDA, MINIMAL], ids=["default", "full", "keda", "minimal"])
@pytest.mark.parametrize("k8s", ["1.29.0", "1.35.0"])
def test_manifests_valid_against_kubernetes_schemas(helm, values, k8s):
    docs = helm.render(values)
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == CRDS[doc["kind"]]
            continue
        assert doc["kind"] in BUILTIN_KINDS, doc["kind"]
        # strict: unknown fields (e.g. a mis-indented key) are errors.
        kubernetes_validate.validate(doc, k8s, strict=True)


def test_kubernetes_schema_check_catches_errors():
    """Control: the validator used above rejects a malformed probe."""
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": "i", "readinessProbe": {"httpGet": {"path": "/"}}}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.35.0", strict=True)


def test_default_render_has_expected_resources(helm):
    docs = helm.render()
    assert kinds(docs) == sorted(["ConfigMap", "Deployment", "Pod", "PodDisruptionBudget", "Secret",
                                  "Service", "ServiceAccount"])
    assert "replicas" in find(docs, "Deployment")["spec"]


def test_full_render_has_every_optional_resource(helm):
    present = set(kinds(helm.render(FULL)))
    assert {"Ingress", "NetworkPolicy", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "Job"} <= present
    assert "Secret" not in present  # existingSecret: the chart creates none


@pytest.mark.parametrize("values, message", [
    ({"server": {"maxNumSeq": 3}}, "additional properties 'maxNumSeq' not allowed"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"server": {"tensorParallelSize": 3}}, "tensorParallelSize"),
    ({"server": {"dataParallelSize": 0}}, "dataParallelSize"),
    ({"autoscaling": {"metric": "cpu"}}, "metric"),
    ({"probes": {"startup": {"path": "health"}}}, "path"),
])
def test_schema_rejects_bad_values(helm, values, message):
    err = helm.render_error(values)
    assert "schema" in err and message in err, err


# --- the server container ------------------------------------------------------------------


def test_probes_use_named_port_and_right_endpoints(helm):
    docs = helm.render({"server": {"port": 9123}})
    c = server_container(docs)
    assert c["ports"] == [{"name": "http", "containerPort": 9123, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert c["startupProbe"]["httpGet"]["port"] == "http"
    assert config(docs)["MDL_PORT"] == "9123"
    assert find(docs, "Service")["spec"]["ports"][0]["targetPort"] == "http"
    assert "9123" not in json.dumps([c["startupProbe"], c["readinessProbe"], c["livenessProbe"]])


def test_startup_probe_allows_slow_engine_start(helm):
    probe = server_container(helm.render())["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    assert budget >= 600, f"startup probe gives up after {budget}s; a cold 7B start takes ~10 min"


def test_graceful_shutdown_outlasts_drain(helm):
    docs = helm.render()
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    c = server_container(docs)
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = int(config(docs)["MDL_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > sleep + drain


def test_grace_period_shorter_than_drain_is_refused(helm):
    err = helm.render_error({"terminationGracePeriodSeconds": 35, "server": {"drainTimeout": 30}})
    assert "terminationGracePeriodSeconds (35) must exceed" in err


def test_non_root_read_only_root_filesystem(helm):
    docs = helm.render(FULL)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in server_container(docs)["volumeMounts"]}
    # Writable places for a read-only root: exactly the ones the image uses.
    assert {"/tmp", "/cache", "/home/mdl", "/dev/shm", "/models"} == set(mounts)
    assert mounts["/models"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_gpu_count_follows_tensor_parallel_size(helm, tp):
    docs = helm.render({"server": {"tensorParallelSize": tp}})
    res = server_container(docs)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == tp
    assert res["requests"]["nvidia.com/gpu"] == tp
    assert config(docs)["MDL_TENSOR_PARALLEL_SIZE"] == str(tp)


@pytest.mark.parametrize("dp, tp", [(2, 1), (4, 2), (8, 1)])
def test_gpu_count_is_data_parallel_times_tensor_parallel(helm, dp, tp):
    docs = helm.render({"server": {"dataParallelSize": dp, "tensorParallelSize": tp}})
    res = server_container(docs)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == dp * tp
    assert res["requests"]["nvidia.com/gpu"] == dp * tp
    assert config(docs)["MDL_DATA_PARALLEL_SIZE"] == str(dp)
    assert config(docs)["MDL_TENSOR_PARALLEL_SIZE"] == str(tp)


def test_api_processes_reach_the_server(helm):
    assert config(helm.render({"server": {"apiProcesses": 8}}))["MDL_API_PROCESSES"] == "8"
    assert config(helm.render({}))["MDL_API_PROCESSES"] == "1"
    assert "apiProcesses" in helm.render_error({"server": {"apiProcesses": 0}})


def test_gpu_resource_name_and_manual_gpu_request_refused(helm):
    res = server_container(helm.render({"gpuResourceName": "nvidia.com/mig-7g.80gb"}))["resources"]
    assert res["limits"] == {"memory": "96Gi", "nvidia.com/mig-7g.80gb": 1}
    err = helm.render_error({"resources": {"limits": {"nvidia.com/gpu": 4}}})
    assert "do not set resources.limits.nvidia.com/gpu" in err


def test_scheduling_values_reach_the_pod(helm):
    pod = find(helm.render(FULL), "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "gpu-high"
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    assert find(helm.render({"affinity": affinity}), "Deployment")["spec"]["template"]["spec"]["affinity"] == affinity


def test_server_settings_become_contract_env_vars(helm):
    docs = helm.render(FULL)
    data = config(docs)
    assert set(data) <= ENV_VARS, set(data) - ENV_VARS
    assert data["MDL_HOST"] == "0.0.0.0"
    assert data["MDL_MODEL"] == "/models/mdl/7b"
    assert data["MDL_ALLOWED_DOMAINS"] == "a.example,b.example"
    assert data["MDL_ALLOWED_NETWORKS"] == "10.20.0.0/16,fd00::/8"
    assert data["MDL_ENFORCE_EAGER"] == "true"
    assert data["MDL_MAX_AUDIO_SECONDS"] == "600"
    # null / empty values keep the server's defaults: not set at all.
    assert "MDL_KV_CACHE_BYTES" not in data and "MDL_QUANTIZATION" not in data
    assert "MDL_ENFORCE_EAGER" not in config(helm.render())
    c = server_container(docs)
    assert c["envFrom"] == [{"configMapRef": {"name": "rel-midashenglm-serve-config"}}]
    assert env_of(c)["VLLM_LOGGING_LEVEL"]["value"] == "INFO"
    assert c["args"][0] == "serve"


def test_config_change_rolls_the_pods(helm):
    a = find(helm.render(), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    b = find(helm.render({"server": {"maxNumSeqs": 128}}), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert a["checksum/config"] != b["checksum/config"]


# --- model and cache volumes ---------------------------------------------------------------


def volumes(docs) -> dict:
    return {v["name"]: v for v in find(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}


def test_model_from_pvc_read_only(helm):
    v = volumes(helm.render({"model": {"pvc": {"claimName": "ckpts"}}}))
    assert v["model"]["persistentVolumeClaim"] == {"claimName": "ckpts", "readOnly": True}
    assert "emptyDir" in v["compile-cache"]


def test_model_from_host_path_and_cache_on_host(helm):
    v = volumes(helm.render({"model": {"source": "hostPath", "hostPath": {"path": "/data/m"}},
                             "compileCache": {"type": "hostPath"}}))
    assert v["model"]["hostPath"] == {"path": "/data/m", "type": "Directory"}
    assert v["compile-cache"]["hostPath"]["path"] == "/var/cache/midashenglm-serve"


def test_model_download_init_container(helm):
    docs = helm.render(FULL)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == FULL["model"]["download"]["command"]
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    assert volumes(docs)["model"]["emptyDir"]["sizeLimit"] == "40Gi"
    assert volumes(docs)["compile-cache"]["persistentVolumeClaim"]["claimName"] == "vllm-cache"
    err = helm.render_error({"model": {"source": "download"}})
    assert "model.download.command" in err


# --- API keys -------------------------------------------------------------------------------


def test_api_keys_literal(helm):
    docs = helm.render({"auth": {"apiKeys": ["key-aaaaaaaaaaaaaaaa", "key-bbbbbbbbbbbbbbbb"]}})
    secret = find(docs, "Secret")
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "key-aaaaaaaaaaaaaaaa,key-bbbbbbbbbbbbbbbb"
    ref = env_of(server_container(docs))["MDL_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "api-keys"}
    assert "checksum/api-keys" in find(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "key-aaaa" not in yaml.safe_dump(find(docs, "Deployment"))  # only a reference in the pod


def test_api_keys_by_reference(helm):
    docs = helm.render({"auth": {"existingSecret": "team-keys", "existingSecretKey": "keys"}})
    assert "Secret" not in kinds(docs)
    ref = env_of(server_container(docs))["MDL_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "team-keys", "key": "keys"}
    test_pod = find(docs, "Pod", "-test")
    assert env_of(test_pod["spec"]["containers"][0])["MDL_API_KEY"]["valueFrom"]["secretKeyRef"] == ref


def test_api_key_generated_by_default(helm):
    docs = helm.render()
    key = base64.b64decode(find(docs, "Secret")["data"]["api-keys"]).decode()
    assert re.fullmatch(r"mdl-[A-Za-z0-9]{40}", key)


def test_api_key_contradictions_refused(helm):
    assert "not both" in helm.render_error({"auth": {"existingSecret": "s", "apiKeys": ["k" * 20]}})
    assert "auth.enabled needs API keys" in helm.render_error({"auth": {"generate": False}})
    assert "schema" in helm.render_error({"auth": {"apiKeys": ["short"]}})


def test_auth_disabled(helm):
    docs = helm.render({"auth": {"enabled": False}})
    assert "Secret" not in kinds(docs)
    assert "MDL_API_KEYS" not in env_of(server_container(docs))
    err = helm.render_error({"auth": {"enabled": False}, "ingress": {"enabled": True}})
    assert "ingress.allowUnauthenticated" in err
    docs = helm.render({"auth": {"enabled": False}, "ingress": {"enabled": True, "allowUnauthenticated": True}})
    assert "Ingress" in kinds(docs)


# --- availability and scaling --------------------------------------------------------------


def test_pdb(helm):
    docs = helm.render()
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": find(docs, "Deployment")["spec"]["selector"]}
    pdb = find(helm.render({"replicaCount": 3, "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": 2}}),
               "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2 and "maxUnavailable" not in pdb["spec"]
    assert "not both" in helm.render_error({"podDisruptionBudget": {"minAvailable": 1}})
    err = helm.render_error({"replicaCount": 2, "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": 2}})
    assert "blocks every node drain" in err
    assert "PodDisruptionBudget" not in kinds(helm.render({"podDisruptionBudget": {"enabled": False}}))


def test_keda_scales_on_clips_in_flight(helm):
    docs = helm.render(KEDA)
    assert "replicas" not in find(docs, "Deployment")["spec"]
    assert "HorizontalPodAutoscaler" not in kinds(docs)
    so = find(docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == find(docs, "Deployment")["metadata"]["name"]
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 5)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"] == 'sum(mdl_clips_in_flight{namespace="ml",service="rel-midashenglm-serve"})'
    assert trigger["metadata"]["threshold"] == "64"
    docs = helm.render({"autoscaling": {**KEDA["autoscaling"], "metric": "queue_length", "target": 8}})
    trigger = find(docs, "ScaledObject")["spec"]["triggers"][0]
    assert trigger["metadata"]["query"].startswith("sum(mdl_queue_length{") and trigger["metadata"]["threshold"] == "8"


def test_hpa_scales_on_custom_pod_metric_not_cpu(helm):
    docs = helm.render(FULL)
    hpa = find(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "mdl_clips_in_flight"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "64"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert "cpu" not in json.dumps(hpa["spec"]["metrics"])
    assert "ScaledObject" not in kinds(docs)


def test_autoscaling_bounds_refused(helm):
    err = helm.render_error({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}})
    assert "minReplicas (5) > autoscaling.maxReplicas (2)" in err
    err = helm.render_error({"autoscaling": {"enabled": True, "keda": {"serverAddress": ""}}})
    assert "serverAddress" in err


# --- names and labels ----------------------------------------------------------------------


def test_selector_labels_never_follow_user_labels_or_versions(helm):
    base = find(helm.render(), "Deployment")["spec"]["selector"]
    changed = helm.render({"commonLabels": {"team": "audio", "app.kubernetes.io/instance": "hijack"},
                           "podLabels": {"app.kubernetes.io/component": "other", "tier": "gpu"},
                           "image": {"tag": "9.9.9"}})
    dep = find(changed, "Deployment")
    assert dep["spec"]["selector"] == base
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["tier"] == "gpu"
    for k, v in base["matchLabels"].items():
        assert pod_labels[k] == v  # selector labels win over podLabels
    assert dep["metadata"]["labels"]["team"] == "audio"
    assert dep["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"  # chart labels win
    assert find(changed, "Service")["spec"]["selector"] == base["matchLabels"]


def test_test_pod_is_not_selected_by_the_service(helm):
    docs = helm.render()
    selector = find(docs, "Service")["spec"]["selector"]
    labels = find(docs, "Pod", "-test")["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in selector.items())


def test_names_fit_63_characters(helm):
    docs = helm.render(FULL, release="r" * 53)  # 53: Helm's longest release name
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    for kind, name in names:
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), (kind, name)
    assert len(set(names)) == len(names)
    assert find(docs, "Pod")["metadata"]["name"].endswith("-test")
    assert find(docs, "ConfigMap", "-config")["metadata"]["name"].endswith("-mi-config")  # truncated, suffix kept


def test_fullname_override_is_capped_by_schema(helm):
    assert "schema" in helm.render_error({"fullnameOverride": "f" * 70})
    docs = helm.render({"fullnameOverride": "g" * 63})
    assert find(docs, "Pod")["metadata"]["name"] == "g" * 58 + "-test"


# --- networking and monitoring --------------------------------------------------------------


def test_ingress_routes_to_the_service(helm):
    docs = helm.render(FULL)
    rule = find(docs, "Ingress")["spec"]["rules"][0]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": find(docs, "Service")["metadata"]["name"], "port": {"number": 8000}}


def test_network_policy(helm):
    docs = helm.render(FULL)
    np = find(docs, "NetworkPolicy")
    assert np["spec"]["podSelector"] == find(docs, "Deployment")["spec"]["selector"]
    (rule,) = np["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    test_labels = find(docs, "Pod", "-test")["metadata"]["labels"]
    peers = [p["podSelector"]["matchLabels"] for p in rule["from"] if "podSelector" in p]
    assert any(all(test_labels.get(k) == v for k, v in m.items()) for m in peers), "helm test pod blocked"
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert {"port": 53, "protocol": "UDP"} in np["spec"]["egress"][0]["ports"]


def test_service_monitor_selects_the_service(helm):
    docs = helm.render(FULL)
    sm = find(docs, "ServiceMonitor")
    svc = find(docs, "Service")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    (ep,) = sm["spec"]["endpoints"]
    assert (ep["port"], ep["path"]) == (svc["spec"]["ports"][0]["name"], "/metrics")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


def test_prometheus_rule_and_dashboard_render_the_chart_files(helm):
    docs = helm.render(FULL)
    rules = yaml.safe_load((CHART / "files/alerts.yml").read_text())
    assert rules["groups"] and find(docs, "PrometheusRule")["spec"] == rules
    dash = find(docs, "ConfigMap", "-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads((CHART / "files/dashboard.json").read_text())
    assert dashboard["panels"] and json.loads(dash["data"]["midashenglm-serve.json"]) == dashboard


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [REPO / f for f in out.stdout.decode().split("\0") if f and (REPO / f).is_file()]


def copies_of_chart_files(files: list[Path]) -> list[tuple[Path, Path]]:
    """(chart file, other file) pairs with the same content, the other outside the chart."""
    chart = {f.read_bytes(): f for f in files if f.is_relative_to(CHART)}
    return [(chart[f.read_bytes()], f) for f in files if not f.is_relative_to(CHART) and f.read_bytes() in chart]


def test_chart_holds_no_copies_of_repository_files():
    """The alert rules and the dashboard live once, in the chart (which cannot read files
    outside itself); deploy/docker-compose.yml mounts them from there."""
    files = tracked_files()
    assert CHART / "files/alerts.yml" in files and CHART / "files/dashboard.json" in files
    assert copies_of_chart_files(files) == []


def test_copy_finder_control(tmp_path):
    """Control: a file outside the chart with a chart file's content is reported."""
    copy = tmp_path / "alerts-copy.yml"
    copy.write_bytes((CHART / "files/alerts.yml").read_bytes())
    found = copies_of_chart_files([CHART / "files/alerts.yml", CHART / "Chart.yaml", copy])
    assert found == [(CHART / "files/alerts.yml", copy)]


def test_notes_explain_key_and_test(helm):
    out = helm.run("install", "rel", str(CHART), "-n", "ml", "--dry-run=client")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "get secret rel-midashenglm-serve-api-keys" in notes
    assert "helm test -n ml rel" in notes
    assert "rollout status deployment/rel-midashenglm-serve" in notes


def test_configmap_is_accepted_by_the_gateway_settings(helm, monkeypatch):
    """The rendered MDL_* variables parse into the gateway's Settings (pydantic, extra=forbid)."""
    settings = pytest.importorskip("mdlserve.server.settings")
    docs = helm.render(FULL)
    for k in [k for k in __import__("os").environ if k.startswith("MDL_")]:
        monkeypatch.delenv(k)
    for k, v in config(docs).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MDL_API_KEYS", "key-aaaaaaaaaaaaaaaa,key-bbbbbbbbbbbbbbbb")
    s = settings.Settings()
    assert (s.host, s.port, s.model) == ("0.0.0.0", 8000, "/models/mdl/7b")
    assert s.tensor_parallel_size == 2 and s.enforce_eager is True and s.drain_timeout == 30
    assert s.allowed_domains == ["a.example", "b.example"]
    assert s.api_keys == ["key-aaaaaaaaaaaaaaaa", "key-bbbbbbbbbbbbbbbb"]


# --- the batch Indexed Job (mdl-serve batch, docs/batch.md) --------------------------------


def batch_pod(docs) -> dict:
    return find(docs, "Job", "-batch")["spec"]["template"]["spec"]


def test_batch_job_is_an_indexed_job_with_one_output_file_per_shard(helm):
    docs = helm.render(FULL)
    job = find(docs, "Job", "-batch")
    assert job["metadata"]["name"] == "rel-midashenglm-serve-batch"
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 8, 4)
    pod = batch_pod(docs)
    assert pod["restartPolicy"] == "OnFailure"  # a killed container restarts in place and resumes
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["batch", "/data/sets/clotho/manifest.csv"]
    assert args[args.index("--shard") + 1] == "auto/8"
    assert args[args.index("--output") + 1] == "/output/runs/clotho-1/shard-{shard}.jsonl"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
    assert mounts["output"]["mountPath"] == "/output" and not mounts["output"].get("readOnly")
    assert mounts["model"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "datasets", "readOnly": True}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "results"}
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-model"]  # model.source=download
    # The same model and engine settings as the server, and the same GPUs per pod.
    assert container["envFrom"] == server_container(docs)["envFrom"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # Not a server pod: the Service's selector must not send requests to it.
    labels = job["spec"]["template"]["metadata"]["labels"]
    selector = find(docs, "Service")["spec"]["selector"]
    assert labels["app.kubernetes.io/component"] == "batch" and not selector.items() <= labels.items()


def test_batch_job_args_parse_as_the_batch_command_of_each_shard(helm, monkeypatch):
    """The rendered args are a valid `mdl-serve batch` command line, and pod 7 of 8 takes
    shard 7/8 and writes shard-7.jsonl."""
    cli = pytest.importorskip("mdlserve.server.cli")
    from mdlserve.server.batch.ids import Shard
    from mdlserve.server.batch.options import BatchOptions
    from mdlserve.server.batch.runner import output_path

    (container,) = batch_pod(helm.render(FULL))["containers"]
    args = cli.build_parser().parse_args(container["args"])
    given = {k: v for k, v in vars(args).items() if k in BatchOptions.model_fields}
    options = BatchOptions(input=args.paths[0], **given)
    assert (options.task, options.lang, options.max_tokens, options.max_in_flight) == ("asr", "zh", 64, 512)
    shard = Shard.parse(options.shard, {"JOB_COMPLETION_INDEX": "7"})
    assert shard == Shard(7, 8)
    assert str(output_path(options, shard)) == "/output/runs/clotho-1/shard-7.jsonl"


def test_batch_job_is_off_by_default_and_servers_are_unchanged_by_it(helm):
    assert "Job" not in kinds(helm.render())
    with_job = helm.render(FULL)
    assert find(with_job, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"][0] == "serve"


@pytest.mark.parametrize("batch, message", [
    ({"enabled": True, "input": "m.csv", "output": {"claimName": "r"}}, "batch.data.claimName"),
    ({"enabled": True, "input": "m.csv", "data": {"claimName": "d"}}, "batch.output.claimName"),
    ({"enabled": True, "data": {"claimName": "d"}, "output": {"claimName": "r"}}, "batch.input"),
])  # fmt: skip
def test_batch_job_refuses_missing_claims_or_input(helm, batch, message):
    assert message in helm.render_error({"batch": batch})


@pytest.mark.parametrize("batch, message", [
    ({"shards": 0}, "shards"), ({"format": "parquet"}, "format"), ({"task": "poetry"}, "task"),
    ({"outputDir": "../escape"}, "outputDir"), ({"shard": 2}, "additional properties 'shard' not allowed"),
])  # fmt: skip
def test_batch_schema_rejects_bad_values(helm, batch, message):
    err = helm.render_error({"batch": batch})
    assert "schema" in err and message in err, err
