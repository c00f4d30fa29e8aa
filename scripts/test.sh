#!/usr/bin/env bash
# The test command: installs and starts what is missing (scripts/services.sh), then runs the
# formatting, lint, test and doc checks of the whole workspace against real Redis, RabbitMQ,
# Celery and moto. With CI=true a missing service fails the run instead of skipping tests.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/services.sh)"
echo "== services: redis $CELERY_SCALE_REDIS_URL, rabbitmq 127.0.0.1:5672 (+15672), moto $CELERY_SCALE_MOTO_URL"
export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps
echo "== cargo test"
cargo test --workspace --all-features --all-targets --no-fail-fast
cargo test --workspace --all-features --doc
