//! `celery-scale check` on the shipped sample configurations (against real Redis, RabbitMQ and
//! moto's ECS, Auto Scaling and SQS, with the targets and queues they name), and what the binary says when something is wrong:
//! a broker it cannot reach, a bad field, a missing secret, `--help`, and secrets at
//! `RUST_LOG=trace`.

use std::path::{Path, PathBuf};

mod common;

use celery_scale_testing::{MotoTarget, Services, TempDir, python, run, unique};

const BIN: &str = env!("CARGO_BIN_EXE_celery-scale");

/// This file's Redis database.
const DB: u32 = 14;

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

fn env_with(s: &Services, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = s.aws_env();
    env.push(("CELERY_SCALE_LOG_FORMAT", "text".into()));
    env.extend(extra.iter().cloned());
    env
}

#[test]
fn every_sample_configuration_checks_out() {
    let Some(s) = Services::get() else { return };
    // The targets the samples name.
    let _targets = [
        MotoTarget::ecs_named(&s, "celery", "workers", 2),
        MotoTarget::ecs_named(&s, "celery", "email-workers", 0),
        MotoTarget::ecs_named(&s, "celery", "billing-workers", 1),
        MotoTarget::ec2_named(&s, "celery-workers", 4),
        MotoTarget::ec2_named(&s, "report-workers", 4),
    ];
    // The SQS queue ecs-sqs.toml names: Celery's `celery` with the prefix `prod-`. Its broker
    // URL is `sqs://`: the endpoint is moto's, from AWS_ENDPOINT_URL.
    common::create(&s.moto, "prod-celery");
    for (file, broker) in [
        ("ecs-redis.toml", s.redis_db(DB)),
        ("ec2-redis.toml", s.redis_db(DB)),
        ("ecs-amqp.toml", s.amqp.clone()),
        ("ec2-amqp.toml", s.amqp.clone()),
        ("several.toml", s.redis_db(DB)),
        ("ecs-sqs.toml", String::new()),
    ] {
        let env = env_with(
            &s,
            &[
                ("CELERY_BROKER_URL", broker),
                ("BILLING_BROKER_URL", s.amqp.clone()),
            ],
        );
        let path = sample(file);
        let (status, out, err) = run(
            Path::new(BIN),
            &["check", "--config", path.to_str().unwrap()],
            &env,
        );
        assert!(status.success(), "{file}: {status}\n{out}\n{err}");
        assert!(out.contains("decision: would"), "{file}:\n{out}");
        assert!(!out.contains("FAILED"), "{file}:\n{out}");
        if file == "ecs-redis.toml" {
            // The service is at 2 with an empty queue: check says what it would do and sets
            // nothing (the fresh loop holds its scale-in window first).
            assert!(out.contains("capacity: desired 2"), "{out}");
            let (st, shown, _) = run(
                Path::new(BIN),
                &["check", "--config", path.to_str().unwrap(), "--json"],
                &env,
            );
            assert!(st.success());
            let records: serde_json::Value = serde_json::from_str(&shown).unwrap();
            assert_eq!(records[0]["dry_run"], true, "{shown}");
        }
        if file == "ecs-sqs.toml" {
            assert!(out.contains("(sqs -> ECS service celery/workers)"), "{out}");
            // SQS tells no worker figures: unknown, never 0.
            assert!(
                out.contains("unknown executing, unknown live workers"),
                "{out}"
            );
        }
    }
    assert_eq!(_targets[0].desired(), 2, "check set nothing");
}

#[test]
fn a_broker_it_cannot_reach_fails_the_check_with_status_1() {
    let Some(s) = Services::get() else { return };
    let _target = MotoTarget::ecs_named(&s, "celery", "workers", 2);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let env = env_with(
        &s,
        &[("CELERY_BROKER_URL", format!("redis://127.0.0.1:{port}/0"))],
    );
    let path = sample("ecs-redis.toml");
    let (status, out, err) = run(
        Path::new(BIN),
        &[
            "check",
            "--config",
            path.to_str().unwrap(),
            "--warmup-timeout",
            "2s",
        ],
        &env,
    );
    assert_eq!(status.code(), Some(1), "{out}\n{err}");
    assert!(out.contains("observe: FAILED"), "{out}");
    assert!(
        err.contains("could not observe or read capacity for: default-queue"),
        "{err}"
    );
}

#[test]
fn configuration_mistakes_are_sentences_naming_the_field_with_status_2() {
    let Some(s) = Services::get() else { return };
    let dir = TempDir::new("cli-config");
    const POLICY: &str = "policy = { max_workers = 40 }";
    const QUEUES: &str = "queues = [\"celery\"]";
    const PER_TASK: &str = "workers_per_task = 4 ";
    // (text of the sample, its replacement, what the error must say)
    let cases = [
        (
            POLICY,
            "policy = { max_workers = -1 }",
            "bindings[0].policy.max_workers: ",
        ),
        (
            POLICY,
            "policy = { max_worker = 3 }",
            "bindings[0].policy.max_worker: ",
        ),
        (
            POLICY,
            "policy = { max_workers = 1000000000 }",
            "above the maximum",
        ),
        // Inside the `kind`-tagged sections the path goes down to the field.
        (
            PER_TASK,
            "workers_per_task = -1 ",
            "bindings[0].scaler.workers_per_task: invalid value: integer `-1`, expected u32",
        ),
        (
            QUEUES,
            "queues = [\"celery\"]\ntimeout = -5",
            "bindings[0].source.timeout: ",
        ),
        (
            QUEUES,
            "queues = [\"celery\", 7]",
            "bindings[0].source.queues[1]: ",
        ),
        (
            "kind = \"redis\"",
            "kind = \"redis-cluster\"",
            "bindings[0].source.kind: unknown variant `redis-cluster`",
        ),
        (
            "kind = \"ecs\"",
            "kind = \"fargate\"",
            "bindings[0].scaler.kind: unknown variant `fargate`",
        ),
    ];
    for (from, policy, expected) in cases {
        let sample_text = std::fs::read_to_string(sample("ecs-redis.toml")).unwrap();
        assert_eq!(sample_text.matches(from).count(), 1, "{from}");
        let text = sample_text.replace(from, policy);
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let env = env_with(&s, &[("CELERY_BROKER_URL", s.redis_db(DB))]);
        let (status, _, err) = run(
            Path::new(BIN),
            &["check", "--config", path.to_str().unwrap()],
            &env,
        );
        assert_eq!(status.code(), Some(2), "{policy}: {err}");
        assert!(err.starts_with("celery-scale: "), "a sentence: {err}");
        assert!(err.contains(expected), "{policy}: {err}");
    }
    // The secret's variable is not set: said by name.
    let path = sample("ecs-redis.toml");
    let env: Vec<_> = env_with(&s, &[])
        .into_iter()
        .filter(|(k, _)| *k != "CELERY_BROKER_URL")
        .collect();
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .env_remove("CELERY_BROKER_URL")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("environment variable CELERY_BROKER_URL is not set")
            && err.contains("bindings[0].source"),
        "{err}"
    );
}

#[test]
fn help_never_shows_environment_values() {
    let secret = unique("S3cret");
    for args in [&["--help"][..], &["run", "--help"], &["check", "--help"]] {
        let (status, out, err) = run(
            Path::new(BIN),
            args,
            &[
                ("CELERY_SCALE_CONFIG", format!("/etc/{secret}.toml")),
                ("CELERY_SCALE_LISTEN", secret.clone()),
                ("CELERY_SCALE_LOG_FORMAT", "text".into()),
            ],
        );
        assert!(status.success(), "{args:?}: {err}");
        assert!(
            !out.contains(&secret) && !err.contains(&secret),
            "{args:?}:\n{out}"
        );
    }
}

/// A RabbitMQ user of this test's own, with a password found nowhere else.
fn rabbitmq_user(s: &Services, user: &str, password: &str) {
    let mgmt = std::env::var("CELERY_SCALE_RABBITMQ_MGMT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into());
    let code = format!(
        r#"
import base64, json, urllib.request, urllib.parse
u = urllib.parse.urlsplit({mgmt:?})
auth = base64.b64encode(f"{{u.username}}:{{u.password}}".encode()).decode()
def put(path, body):
    req = urllib.request.Request(f"{{u.scheme}}://{{u.hostname}}:{{u.port}}{{path}}", data=json.dumps(body).encode(), method="PUT")
    req.add_header("Authorization", "Basic " + auth)
    req.add_header("Content-Type", "application/json")
    urllib.request.urlopen(req).read()
put("/api/users/{user}", {{"password": {password:?}, "tags": ""}})
put("/api/permissions/%2F/{user}", {{"configure": ".*", "write": ".*", "read": ".*"}})
"#
    );
    python(&s.python, "memory://", &["-c", &code], &[]);
}

#[test]
fn no_secret_shows_in_any_output_even_at_trace_level() {
    let Some(s) = Services::get() else { return };
    let _targets = [
        MotoTarget::ecs_named(&s, "celery", "workers", 2),
        MotoTarget::ecs_named(&s, "celery", "email-workers", 0),
        MotoTarget::ecs_named(&s, "celery", "billing-workers", 1),
        MotoTarget::ec2_named(&s, "report-workers", 4),
    ];
    let amqp_password = unique("AmqpPw");
    let user = unique("cli-secrets");
    rabbitmq_user(&s, &user, &amqp_password);
    let redis_password = unique("RedisPw");
    let aws_secret = unique("AwsSecret");
    // Redis without a password: AUTH with one fails, and the error must not show it.
    let redis = format!(
        "redis://:{redis_password}@{}/{DB}",
        s.redis.trim_start_matches("redis://")
    );
    let amqp = format!("amqp://{user}:{amqp_password}@127.0.0.1:5672/%2f");
    let wrong_amqp = format!("amqp://{user}:{amqp_password}x@127.0.0.1:5672/%2f");
    let mut env = s.aws_env();
    env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    env.extend([
        ("AWS_SECRET_ACCESS_KEY", aws_secret.clone()),
        ("RUST_LOG", "trace".into()),
        ("CELERY_BROKER_URL", redis),
        ("BILLING_BROKER_URL", amqp),
    ]);
    let path = sample("several.toml");
    let (_, out, err) = run(
        Path::new(BIN),
        &[
            "check",
            "--config",
            path.to_str().unwrap(),
            "--warmup-timeout",
            "5s",
        ],
        &env,
    );
    assert!(err.len() > 10_000, "trace output was written: {err}");
    for secret in [&redis_password, &amqp_password, &aws_secret] {
        assert!(
            !out.contains(secret.as_str()) && !err.contains(secret.as_str()),
            "{secret} shown"
        );
    }
    // And with the wrong AMQP password (the login fails).
    env.retain(|(k, _)| *k != "BILLING_BROKER_URL");
    env.push(("BILLING_BROKER_URL", wrong_amqp));
    let (status, out, err) = run(
        Path::new(BIN),
        &[
            "check",
            "--config",
            path.to_str().unwrap(),
            "--warmup-timeout",
            "3s",
        ],
        &env,
    );
    assert_eq!(status.code(), Some(1), "{out}");
    for secret in [&redis_password, &amqp_password, &aws_secret] {
        assert!(
            !out.contains(secret.as_str()) && !err.contains(secret.as_str()),
            "{secret} shown"
        );
    }
}
