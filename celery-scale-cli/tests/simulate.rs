//! `celery-scale simulate` on the shipped sample configurations: it replays the built-in burst
//! (or a trace file) through each binding's own policy and units, needs no broker and no
//! secret, and says which binding it could not find.

use std::path::{Path, PathBuf};

use celery_scale_testing::{TempDir, run};

const BIN: &str = env!("CARGO_BIN_EXE_celery-scale");

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

/// The numbers of one binding's summary line.
fn completed(out: &str, binding: &str) -> (u64, u64) {
    let at = out
        .find(&format!("binding {binding:?}"))
        .unwrap_or_else(|| panic!("{binding} missing:\n{out}"));
    let line = out[at..].lines().nth(1).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    (
        words[1].parse().unwrap(),
        words[3].trim_end_matches(';').parse().unwrap(),
    )
}

#[test]
fn every_binding_of_a_sample_completes_the_built_in_burst_without_secrets() {
    for file in [
        "ecs-redis.toml",
        "ecs-amqp.toml",
        "ec2-redis.toml",
        "ec2-amqp.toml",
        "several.toml",
        "ecs-sqs.toml",
    ] {
        let path = sample(file);
        let (status, out, err) = run(
            Path::new(BIN),
            &["simulate", "--config", path.to_str().unwrap()],
            &[],
        );
        assert!(status.success(), "{file}: {err}");
        assert!(out.starts_with("trace: 320 tasks"), "{out}");
        let names: &[&str] = if file == "several.toml" {
            &["emails", "reports", "billing"]
        } else {
            &["default-queue"]
        };
        for name in names {
            let (done, of) = completed(&out, name);
            assert_eq!((done, of), (320, 320), "{file} {name}:\n{out}");
        }
    }
}

#[test]
fn a_trace_file_and_the_units_of_the_configuration_are_used() {
    let dir = TempDir::new("cli-sim");
    let trace = dir.join("trace.csv");
    std::fs::write(&trace, "at_s,count,duration_s,queue\n10,40,30,celery\n").unwrap();
    let config = dir.join("one.toml");
    std::fs::write(
        &config,
        r#"[[bindings]]
loop = { name = "one", interval = "5s" }
policy = { max_workers = 8, held_per_worker = 1 }
source = { kind = "redis", url = { env = "NOT_SET_ANYWHERE" }, queues = ["celery"] }
scaler = { kind = "ecs", cluster = "c", service = "s", workers_per_task = 2 }
"#,
    )
    .unwrap();
    let (status, out, err) = run(
        Path::new(BIN),
        &[
            "simulate",
            "--config",
            config.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
        ],
        &[],
    );
    assert!(status.success(), "{err}");
    assert!(out.contains("trace: 40 tasks"), "{out}");
    assert!(
        out.contains("(2 worker process(es) per unit, prefetch 1"),
        "{out}"
    );
    assert_eq!(completed(&out, "one"), (40, 40), "{out}");
    assert!(
        out.contains("peak 8 workers"),
        "max_workers bounds the fleet: {out}"
    );

    let (status, _, err) = run(
        Path::new(BIN),
        &[
            "simulate",
            "--config",
            config.to_str().unwrap(),
            "--binding",
            "two",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("no binding named \"two\""), "{err}");

    // The target's fields are checked as `run` and `check` check them.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        r#"[[bindings]]
loop = { name = "one", interval = "5s" }
source = { kind = "redis", url = { env = "NOT_SET_ANYWHERE" }, queues = ["celery"] }
scaler = { kind = "ecs", cluster = "c", service = "s", protect_busy_units = true, protection_expires_in = "30s" }
"#,
    )
    .unwrap();
    let (status, _, err) = run(
        Path::new(BIN),
        &["simulate", "--config", bad.to_str().unwrap()],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("bindings[0].scaler.protection_expires_in"),
        "{err}"
    );
}
