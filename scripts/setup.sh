#!/usr/bin/env bash
# Prepare a machine for meshorch: a virtualenv in .venv with meshorch installed.
#   scripts/setup.sh           Python packages only (enough for the demo; no root)
#   scripts/setup.sh --lab     also the Debian packages the lab and its tests need (root)
#   scripts/setup.sh --bench   also the benchmark anchors (etcd; root)
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium, chromium-driver: the hub dashboard's browser tests (tests/hub/test_dashboard.py).
# strace: the durability test traces the agent's fdatasyncs (tests/agent/test_durability_strace.py).
# containernetworking-plugins: podman's CNI bridges, one per tenant (meshorch/runtime/podman.py);
# named so that apt does not pick netavark for podman's network stack.
LAB_PACKAGES=(iproute2 iptables nftables wireguard-go wireguard-tools procps
  containernetworking-plugins podman runc busybox-static chromium chromium-driver strace)
LAB_PACKAGES+=(e2fsprogs mount)  # mkfs.ext4, losetup: the chaos power cut's lossy disks
# docker-registry (the CNCF distribution registry), apache2-utils (htpasswd -B): the lab's
# real OCI registry (meshorch/lab/registry.py, tests/images/test_registry_pull.py).
LAB_PACKAGES+=(docker-registry apache2-utils)
BENCH_PACKAGES=(etcd-server etcd-client)

want_apt=()
for arg in "$@"; do
  case "$arg" in
    --lab) want_apt+=("${LAB_PACKAGES[@]}") ;;
    --bench) want_apt+=("${BENCH_PACKAGES[@]}") ;;
    *) echo "setup.sh: unknown option $arg (use --lab, --bench)" >&2; exit 2 ;;
  esac
done

if ((${#want_apt[@]})); then
  missing=()
  for pkg in "${want_apt[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
      echo "setup.sh: need root to install Debian packages: ${missing[*]}" >&2
      exit 1
    fi
    echo "==> apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || echo "setup.sh: apt-get update failed, trying the cached lists" >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup.sh: meshorch needs Python >= 3.11 ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "==> pip install -e .[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
