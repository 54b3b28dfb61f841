#!/usr/bin/env bash
# Moves a Pod with curl, as a script or a scheduler extender would: POST /migrate/<uid> to
# the podmig daemon of the Pod's node, authenticated with a ServiceAccount token that the
# chart's ClusterRole podmig-migrator allows to move Pods. Prints the move's outcome (JSON).
#
#   examples/migrate-with-curl.sh POD TARGET_NODE [NAMESPACE]
#
# Environment: PODMIG_CA (the daemons' CA certificate; default: read from the chart's
# Secret <release>-node-ca), PODMIG_RELEASE (podmig), PODMIG_NAMESPACE (podmig-system),
# PODMIG_PORT (10443).
set -euo pipefail
POD=${1:?usage: $0 POD TARGET_NODE [NAMESPACE]}
TARGET=${2:?usage: $0 POD TARGET_NODE [NAMESPACE]}
NS=${3:-default}
RELEASE=${PODMIG_RELEASE:-podmig}
RELEASE_NS=${PODMIG_NAMESPACE:-podmig-system}

# 1. A ServiceAccount allowed to move Pods.
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: ServiceAccount
metadata: {name: podmig-mover, namespace: $NS}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: podmig-mover-$NS}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: $RELEASE-migrator}
subjects: [{kind: ServiceAccount, name: podmig-mover, namespace: $NS}]
YAML

# 2. A short-lived token for it (TokenRequest; `kubectl create token` does the same).
TOKEN=$(echo '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":600}}' \
  | kubectl create --raw "/api/v1/namespaces/$NS/serviceaccounts/podmig-mover/token" -f - \
  | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
[ -n "$TOKEN" ] || { echo "no token for podmig-mover" >&2; exit 1; }

# 3. The Pod's uid and the address of its node's daemon.
POD_UID=$(kubectl -n "$NS" get pod "$POD" -o jsonpath='{.metadata.uid}')
NODE=$(kubectl -n "$NS" get pod "$POD" -o jsonpath='{.spec.nodeName}')
NODE_IP=$(kubectl get node "$NODE" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')

# 4. The CA the daemons' certificates are issued from.
CA=${PODMIG_CA:-}
if [ -z "$CA" ]; then
  CA=$(mktemp); trap 'rm -f "$CA"' EXIT
  kubectl -n "$RELEASE_NS" get secret "$RELEASE-node-ca" -o jsonpath='{.data.ca\.crt}' | base64 -d > "$CA"
fi

# 5. The move; ?wait=true answers when it ended (200 Succeeded, or an error as JSON).
curl --fail-with-body -sS --cacert "$CA" \
  -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  --data "{\"targetNode\": \"$TARGET\"}" \
  "https://$NODE_IP:${PODMIG_PORT:-10443}/migrate/$POD_UID?wait=true"
echo
