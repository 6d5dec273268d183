"""Checks the Helm chart's rendered manifests, then runs the real binary the way the chart
runs it. Called by scripts/chart.sh with the renderings it made:

    chart_check.py RENDER_DIR BINARY DATABASE_URL

RENDER_DIR holds default.yaml, hpa.yaml, split.yaml and mesh.yaml (helm template output).
The binary check takes the Deployment's container (ports, args, env, envFrom of the
rendered ConfigMap and Secret), the image's ENV from the Dockerfile, and the migration
Job's args; runs `migrate` then `serve` against DATABASE_URL with those settings; and checks
that every probe answers, every declared port is served, and SIGTERM within the chart's
grace period drains and exits 0.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind):
    found = kinds(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def check_default(docs):
    dep = one(docs, "Deployment")
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    c = container(dep)
    assert spec["replicas"] == 3, spec.get("replicas")
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["minReadySeconds"] > 0 and spec["revisionHistoryLimit"] > 0
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/secret"} <= set(annotations), annotations
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "exec" not in c["livenessProbe"] and "exec" not in c["readinessProbe"], "no exec probes"
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_ms = int(one(docs, "ConfigMap")["data"]["APP_SHUTDOWN__DRAIN_TIMEOUT_MS"])
    assert pod["terminationGracePeriodSeconds"] > sleep + drain_ms / 1000
    psc, sc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0
    assert isinstance(psc["runAsGroup"], int) and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    keys = {t["topologyKey"] for t in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, keys
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert ports["http"]["appProtocol"] == "http"
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["metrics"]["appProtocol"] == "http"
    job = one(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container(job)["args"] == ["migrate"]
    assert one(docs, "ConfigMap")["data"]["APP_DATABASE__MIGRATE_ON_START"] == "false"
    policy = one(docs, "NetworkPolicy")["spec"]
    api_ports = {p["port"] for p in policy["ingress"][0]["ports"]}
    assert api_ports == {"http", "grpc"}, api_ports
    admin = policy["ingress"][1]
    assert [p["port"] for p in admin["ports"]] == ["metrics"]
    assert admin["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert "Egress" in policy["policyTypes"]
    tests = [p for p in kinds(docs, "Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    assert len(tests) == 3, [t["metadata"]["name"] for t in tests]
    for t in tests + [job["spec"]["template"]]:
        meta = t["metadata"]["annotations"]
        assert meta["linkerd.io/inject"] == "disabled" and meta["sidecar.istio.io/inject"] == "false"
    return dep


def check_hpa(docs):
    dep = one(docs, "Deployment")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert kinds(docs, "PodDisruptionBudget"), "the PDB is not gated on replicas or the HPA"


def check_split(docs):
    deps = {container(d)["env"][0]["value"]: d for d in kinds(docs, "Deployment")}
    assert set(deps) == {"api", "relay", "consumer"}, set(deps)
    for role, dep in deps.items():
        label = dep["spec"]["template"]["metadata"]["labels"]["orders-service/api"]
        assert label == ("true" if role == "api" else "false"), (role, label)
    assert one(docs, "Service")["spec"]["selector"]["orders-service/api"] == "true"
    assert len(kinds(docs, "PodDisruptionBudget")) == 3
    assert {d["kind"] for d in docs} >= {"ServiceMonitor", "PrometheusRule", "HTTPRoute", "GRPCRoute"}


def check_mesh(docs):
    dep = one(docs, "Deployment")
    assert dep["spec"]["template"]["metadata"]["annotations"]["linkerd.io/inject"] == "enabled"
    assert container(dep)["readinessProbe"]["grpc"]["port"] == 50051
    assert container(dep)["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness never depends on the DB"


def image_env():
    """The ENV the Dockerfile gives the runtime image (what the chart relies on)."""
    text = open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8").read()
    runtime = text.split("FROM gcr.io/distroless")[1]
    block = re.search(r"^ENV (.*?)(?=^\S)", runtime, re.S | re.M).group(1)
    return dict(re.findall(r"(APP_[A-Z_]+)=(\S+)", block))


def wait_http(url, deadline, expect=200):
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == expect:
                    return
                last = r.status
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {expect}: {last}")


def run_like_the_chart(docs, binary, database_url):
    dep = one(docs, "Deployment")
    c = container(dep)
    configmap = one(docs, "ConfigMap")["data"]
    secret = next(s for s in kinds(docs, "Secret") if s["metadata"]["name"] == dep["metadata"]["name"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("APP_")}
    env.update(image_env())
    env.update(configmap)
    env.update(secret["stringData"])
    env.update({k: v for k, v in env_of(c).items() if v is not None})
    # The chart's dependencies are cluster services; here, the local ones.
    env["APP_DATABASE__URL"] = database_url
    env["APP_REDIS__URL"] = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
    env["APP_KAFKA__BROKERS"] = os.environ.get("TEST_KAFKA_BROKERS", "127.0.0.1:9092")
    env["APP_KAFKA__TOPIC_REPLICATION"] = "1"
    env["APP_EVENTS__TOPIC"] = f"orders.events.chart-check-{os.getpid()}"

    job = one(docs, "Job")
    migrate = subprocess.run([binary, *container(job)["args"]], env=env, capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr[-2000:]

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    log = open(os.path.join(os.environ.get("ORDERS_CACHE", "/tmp"), "chart-check.log"), "w", encoding="utf-8")
    proc = subprocess.Popen([binary, *c["args"]], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            wait_http(f"http://127.0.0.1:{ports[get['port']]}{get['path']}", deadline)
        for name, port in ports.items():
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass  # every declared port is served
        wait_http(f"http://127.0.0.1:{ports['metrics']}/metrics", deadline)
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        started = time.time()
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends after the preStop sleep
        code = proc.wait(timeout=grace - sleep)
        took = time.time() - started
        assert code == 0, f"exit code {code} after SIGTERM"
        print(f"chart check: binary served {sorted(ports.values())}, probes answered, drained in {took:.1f}s "
              f"(grace {grace}s, preStop {sleep}s)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def value_paths(values, path=()):
    """The dotted paths of the chart's values, down to the maps that are opaque settings."""
    opaque = {"config", "values", "resources", "podSecurityContext", "securityContext", "egress"}
    if isinstance(values, dict) and values and (not path or path[-1] not in opaque):
        for key, value in values.items():
            yield from value_paths(value, (*path, key))
    else:
        yield ".".join(path)


def check_chart_readme():
    chart = os.path.join(ROOT, "helm", "orders-service")
    values = yaml.safe_load(open(os.path.join(chart, "values.yaml"), encoding="utf-8"))
    readme = open(os.path.join(chart, "README.md"), encoding="utf-8").read()
    missing = [p for p in value_paths(values) if f"| `{p}` |" not in readme]
    assert not missing, f"helm/orders-service/README.md has no row for {missing}"


def main():
    render_dir, binary, database_url = sys.argv[1:4]
    check_chart_readme()
    default = load(os.path.join(render_dir, "default.yaml"))
    check_default(default)
    check_hpa(load(os.path.join(render_dir, "hpa.yaml")))
    check_split(load(os.path.join(render_dir, "split.yaml")))
    check_mesh(load(os.path.join(render_dir, "mesh.yaml")))
    print("chart check: rendered manifests hold their guarantees")
    run_like_the_chart(default, binary, database_url)


if __name__ == "__main__":
    main()
