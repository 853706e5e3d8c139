#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian 12 machine, and nothing twice.
#
# - Debian packages: the brokers' and guests' tools (only those not installed yet; Java and
#   Maven only when no `java`/`mvn` is on PATH). Package scripts may not start services here:
#   the suite starts its own brokers on free ports.
# - This project in editable mode with its test extras (again only when pyproject.toml or the
#   checkout's location changed since the last install).
# - Apache ActiveMQ Artemis, fetched from Maven Central with Maven into a cache OUTSIDE the
#   repository (${QVC_CACHE:-$HOME/.cache/qpid-virtio-connector}) and unpacked there, where
#   tests/brokers/artemis.py looks for it.
# - The Qpid JMS client (a real guest application for test_jms.py), resolved with Maven from
#   tests/jms/pom.xml; its class path is written to the same cache.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${QVC_CACHE:-$HOME/.cache/qpid-virtio-connector}
ARTEMIS_VERSION=2.40.0
ARTEMIS_ARTIFACT="org.apache.activemq:apache-artemis:${ARTEMIS_VERSION}:tar.gz:bin"
PYTHON=${PYTHON:-python3}

APT_PACKAGES=(rabbitmq-server socat amqp-specs qemu-system-x86 qemu-system-data debootstrap
              busybox-static cpio xz-utils openssl gcc libqpid-proton11-dev)
# A JDK, not a JRE: test_jms.py runs a single-file Java program, which needs the compiler.
command -v java >/dev/null || APT_PACKAGES+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || APT_PACKAGES+=(maven)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_debian_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    echo "install-deps: apt-get install ${missing[*]}"
    # Keep rabbitmq-server's postinst from starting a system broker (and a host epmd).
    local policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_python_package() {
    local stamp="$CACHE/pip-install.stamp" want
    want="$REPO $(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    echo "install-deps: pip install -e .[test]"
    "$PYTHON" -m pip install -q -e "$REPO[test]"
    # The coverage-guided fuzzer is optional: its test skips where it does not install.
    "$PYTHON" -m pip install -q atheris || echo "install-deps: atheris unavailable; its fuzz test will skip"
    echo "$want" > "$stamp"
}

install_artemis() {
    local home="$CACHE/apache-artemis-$ARTEMIS_VERSION"
    [ -x "$home/bin/artemis" ] && return
    echo "install-deps: fetching Artemis $ARTEMIS_VERSION with Maven"
    local work
    work=$(mktemp -d "$CACHE/artemis-fetch.XXXXXX")
    # Run Maven outside any project, so no pom.xml nearby changes what it does.
    (cd "$work" && mvn -B -q -Dstyle.color=never dependency:copy -Dartifact="$ARTEMIS_ARTIFACT" -DoutputDirectory="$work")
    tar -xzf "$work/apache-artemis-$ARTEMIS_VERSION-bin.tar.gz" -C "$work"
    rm -rf "$home"
    mv "$work/apache-artemis-$ARTEMIS_VERSION" "$home"   # appears whole or not at all
    rm -rf "$work"
}

install_jms_client() {
    local cp="$CACHE/jms-classpath.txt" stamp="$CACHE/jms-classpath.stamp" want
    want=$(sha256sum "$REPO/tests/jms/pom.xml" | cut -d' ' -f1)
    if [ -f "$cp" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    echo "install-deps: resolving the Qpid JMS client with Maven"
    (cd "$CACHE" && mvn -B -q -Dstyle.color=never -f "$REPO/tests/jms/pom.xml" \
        dependency:build-classpath -Dmdep.outputFile="$cp.tmp")
    mv "$cp.tmp" "$cp"
    echo "$want" > "$stamp"
}

mkdir -p "$CACHE"
install_debian_packages
install_python_package
install_artemis
install_jms_client
echo "install-deps: ready (cache $CACHE)"
