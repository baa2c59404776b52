#!/bin/sh
# The SplitserveCluster CRD and the operator against a real API server: not part of `make test` (it needs binaries
# that take ~6 minutes to fetch and build). Run from the repository root:  sh k8s/test-apiserver.sh
#
# What it checks, with Kubernetes' own apiextensions-apiserver (the CRD half of kube-apiserver) on etcd:
#   1. the API server accepts the CRD (structural schema, CEL rules compile) and reports it Established;
#   2. it rejects bad SplitserveClusters with the schema's messages: negative replicas, an unknown KV backend,
#      replicas together with autoscaling, minReplicas > maxReplicas, two model sources, a colocated pool with
#      replicas and autoscaling, a name too long for NAME-colocated;
#   3. it stores a good one with the CRD's defaults filled in (and an absent colocated pool absent);
#   4. `splitserve operator` (kopf, through k8s/apiserver_discovery_proxy.py) on a resource the schema accepts but
#      render() refuses (an unknown machine type) writes a Degraded condition with the one-line message; once the
#      spec is fixed, Degraded says why applying failed; the operator keeps running throughout (no crash loop).
# This server serves no core or apps kinds (ServiceAccounts, Deployments, Services), so applying a valid cluster's
# objects cannot succeed here: server-side apply of them is checked only by its failure being reported and retried.
# Measured 2026-11-22 on the 2-core dev machine: all checks pass in ~65 s.
#
# Binaries (APISERVER, ETCD; defaults below). Neither is in Debian 12, and no registry here serves kube-apiserver,
# but Debian unstable ships the Go sources. Without touching the system's apt configuration:
#   mkdir -p /tmp/sid/lists/partial /tmp/sid/archives/partial /tmp/sid/cache /tmp/sid/root && cd /tmp/sid && touch status
#   echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main' > sources.list
#   O="-o Dir::Etc::sourcelist=/tmp/sid/sources.list -o Dir::Etc::sourceparts=/nonexistent -o Dir::State::Lists=/tmp/sid/lists
#      -o Dir::State::status=/tmp/sid/status -o Dir::Cache::archives=/tmp/sid/archives -o Dir::Cache=/tmp/sid/cache"
#   apt-get $O update && apt-get $O install --download-only -y --no-install-recommends \
#       golang-k8s-apiextensions-apiserver-dev golang-go etcd-server                     # ~370 MB of .debs
#   for f in archives/golang-*.deb archives/etcd-server*.deb; do dpkg-deb -x "$f" root; done
#   GOROOT=$(ls -d /tmp/sid/root/usr/lib/go-1.* | sort -V | tail -1) GOPATH=/tmp/sid/root/usr/share/gocode \
#       GO111MODULE=off GOTOOLCHAIN=local GOCACHE=/tmp/sid/gocache \
#       "$GOROOT/bin/go" build -o /tmp/sid/apiextensions-apiserver k8s.io/apiextensions-apiserver   # ~5 min, 2 cores
# (measured 2026-11-22: apiextensions-apiserver 0.36.4 with Go 1.27, etcd 3.5.30)
set -eu

APISERVER=${APISERVER:-/tmp/sid/apiextensions-apiserver}
ETCD=${ETCD:-/tmp/sid/root/usr/bin/etcd}
PYTHON=${PYTHON:-.venv/bin/python}
SPLITSERVE=${SPLITSERVE:-.venv/bin/splitserve}
for binary in "$APISERVER" "$ETCD"; do
    [ -x "$binary" ] || { echo "test-apiserver: $binary is missing (see this script's header)" >&2; exit 2; }
done

work=$(mktemp -d)
pids=""
cleanup() {
    for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    for pid in $pids; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ETCD_PORT=$(free_port)
ETCD_PEER_PORT=$(free_port)
API_PORT=$(free_port)
PROXY_PORT=$(free_port)

# One CA for the serving certificate and for a client certificate in system:masters, the group the server
# authorizes without a core API server to ask.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" -keyout "$work/admin.key" -out "$work/admin.csr" 2>/dev/null
openssl x509 -req -in "$work/admin.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial -days 1 \
    -out "$work/admin.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$work/serving.key" -out "$work/serving.csr" 2>/dev/null
echo "subjectAltName=IP:127.0.0.1" > "$work/serving.ext"
openssl x509 -req -in "$work/serving.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial -days 1 \
    -extfile "$work/serving.ext" -out "$work/serving.crt" 2>/dev/null
cat > "$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: $work/ca.crt}}]
users: [{name: admin, user: {client-certificate: $work/admin.crt, client-key: $work/admin.key}}]
contexts: [{name: test, context: {cluster: test, user: admin, namespace: default}}]
current-context: test
EOF

"$ETCD" --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    > "$work/etcd.log" 2>&1 &
pids="$pids $!"
# The server points its "core API" clients at itself: they fail quietly, and admission plugins that need a core
# API server (namespaces, webhooks, policies) are off.
"$APISERVER" --etcd-servers "http://127.0.0.1:$ETCD_PORT" --secure-port "$API_PORT" --bind-address 127.0.0.1 \
    --tls-cert-file "$work/serving.crt" --tls-private-key-file "$work/serving.key" --client-ca-file "$work/ca.crt" --authentication-skip-lookup \
    --kubeconfig "$work/kubeconfig" --authentication-kubeconfig "$work/kubeconfig" \
    --authorization-kubeconfig "$work/kubeconfig" \
    --disable-admission-plugins NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy \
    > "$work/apiserver.log" 2>&1 &
pids="$pids $!"

# kopf and the DynamicClient need the discovery documents (/api, /apis) that kube-apiserver's aggregator would serve.
"$PYTHON" k8s/apiserver_discovery_proxy.py "https://127.0.0.1:$API_PORT" "$work/ca.crt" "$work/admin.crt" \
    "$work/admin.key" "$PROXY_PORT" > "$work/proxy.log" 2>&1 &
pids="$pids $!"
cat > "$work/proxy.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "http://127.0.0.1:$PROXY_PORT"}}]
users: [{name: proxied, user: {}}]
contexts: [{name: test, context: {cluster: test, user: proxied, namespace: default}}]
current-context: test
EOF

export KUBECONFIG="$work/proxy.kubeconfig"
"$PYTHON" - <<'EOF' || { echo "--- apiserver log (tail)"; tail -20 "$work/apiserver.log"; exit 1; }
import sys, time
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

config.load_kube_config()
deadline = time.monotonic() + 90
while True:
    try:
        client.ApiextensionsV1Api().list_custom_resource_definition()
        break
    except (ApiException, HTTPError, OSError) as exc:
        if time.monotonic() > deadline:
            sys.exit(f"test-apiserver: the API server did not come up in 90 s: {exc}")
        time.sleep(1)
print("test-apiserver: API server up")
EOF

"$PYTHON" k8s/apiserver_checks.py "$SPLITSERVE" "$work"
