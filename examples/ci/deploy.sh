#!/usr/bin/env bash
# Deploy an application through the meshorch hub and follow its rollout, for CI.
#
#   examples/ci/deploy.sh [SPEC]        (default: $MESHORCH_APP_SPEC, else deploy/app.yaml)
#
# Environment:
#   MESHORCH_HUB              the hub's URL, e.g. https://hub.example:7900 (required)
#   MESHORCH_TOKEN            an operator token of the app's tenant (required; a secret)
#   MESHORCH_HUB_FINGERPRINT  the SHA-256 fingerprint of the hub's TLS certificate, as
#                             `meshorch hub` prints it (required for https://: a CI runner
#                             has no earlier connection to trust)
#   MESHORCH_DEPLOY_TIMEOUT   seconds to wait for the whole rollout (default 1800)
#   MESHORCH                  the command to run (default: meshorch)
#
# Exit status, as `meshorch deploy --wait`: 0 every wave healthy; 1 the rollout failed (a
# site reported the new version failed, or a wave timed out at the hub: the message names
# the site); 4 still rolling out after MESHORCH_DEPLOY_TIMEOUT; 2 a refused request or a
# bad setting (spec, token, certificate) -- nothing was deployed.
set -euo pipefail

fail() {
    echo "deploy.sh: $*" >&2
    exit 2
}

spec="${1:-${MESHORCH_APP_SPEC:-deploy/app.yaml}}"
timeout="${MESHORCH_DEPLOY_TIMEOUT:-1800}"
[[ -n "${MESHORCH_HUB:-}" ]] || fail "set MESHORCH_HUB to the hub's URL (https://HOST:7900)"
[[ -n "${MESHORCH_TOKEN:-}" ]] || fail "set MESHORCH_TOKEN to an operator token (a CI secret)"
if [[ "$MESHORCH_HUB" == https://* && -z "${MESHORCH_HUB_FINGERPRINT:-}" ]]; then
    fail "set MESHORCH_HUB_FINGERPRINT to the hub's certificate fingerprint (meshorch hub prints it)"
fi
[[ -f "$spec" ]] || fail "no application spec at $spec"
[[ "$timeout" =~ ^[0-9]+$ ]] || fail "MESHORCH_DEPLOY_TIMEOUT must be a number of seconds, not $timeout"
read -r -a cli <<< "${MESHORCH:-meshorch}"

echo "deploying $spec through $MESHORCH_HUB (waiting at most ${timeout}s)"
status=0
"${cli[@]}" deploy -f "$spec" --wait --timeout "$timeout" || status=$?
case "$status" in
    0) echo "deploy.sh: every wave is healthy" ;;
    1) echo "deploy.sh: the rollout FAILED (see the site named above)" >&2 ;;
    4) echo "deploy.sh: the rollout is still going after ${timeout}s; it goes on at the hub" >&2 ;;
    *) echo "deploy.sh: meshorch deploy refused or could not run (exit $status)" >&2 ;;
esac
exit "$status"
