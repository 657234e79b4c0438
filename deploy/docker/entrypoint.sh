#!/bin/sh
# Container entrypoint: `exec toolace-r "$@"`. If TOOLACE_R_API_KEY_FILE names a mounted secret (compose `secrets:`,
# a Kubernetes Secret volume) and TOOLACE_R_API_KEY is unset, the key is read from that file; `toolace-r serve` then
# requires it on /v1/* and /metrics.
set -eu

if [ -n "${TOOLACE_R_API_KEY_FILE:-}" ] && [ -z "${TOOLACE_R_API_KEY:-}" ]; then
    if [ ! -r "$TOOLACE_R_API_KEY_FILE" ]; then
        echo "toolace-r-entrypoint: cannot read TOOLACE_R_API_KEY_FILE=$TOOLACE_R_API_KEY_FILE" >&2
        exit 64
    fi
    TOOLACE_R_API_KEY=$(tr -d '\r\n' < "$TOOLACE_R_API_KEY_FILE")
    if [ -z "$TOOLACE_R_API_KEY" ]; then
        echo "toolace-r-entrypoint: $TOOLACE_R_API_KEY_FILE is empty; put a key in it (openssl rand -hex 32)" >&2
        exit 64
    fi
    export TOOLACE_R_API_KEY
fi

exec toolace-r "$@"
