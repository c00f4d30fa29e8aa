//! docs/ecs.md stays true: the protection recipe it shows is the tested file, and its IAM policy
//! allows exactly the calls this crate makes.

use std::path::PathBuf;

fn repo_file(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fenced blocks of `lang` in `markdown`, in order.
fn blocks<'a>(markdown: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    markdown
        .split(fence.as_str())
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .collect()
}

#[test]
fn the_recipe_in_the_docs_is_the_tested_file() {
    let doc = repo_file("docs/ecs.md");
    let recipe = repo_file("testing/celery/ecs_protection.py");
    let shown = blocks(&doc, "python");
    assert_eq!(shown.len(), 1, "one python block");
    assert_eq!(
        shown[0], recipe,
        "docs/ecs.md shows testing/celery/ecs_protection.py"
    );
}

#[test]
fn the_iam_policy_allows_exactly_the_calls_made() {
    let doc = repo_file("docs/ecs.md");
    let policy: serde_json::Value = blocks(&doc, "json")
        .into_iter()
        .filter_map(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .find(|v| v.get("Statement").is_some())
        .expect("an IAM policy block");
    let mut actions: Vec<&str> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap())
        .map(|a| a.as_str().unwrap())
        .collect();
    actions.sort();
    assert_eq!(
        actions,
        [
            "ecs:DescribeServices",
            "ecs:DescribeTasks",
            "ecs:GetTaskProtection",
            "ecs:ListTasks",
            "ecs:UpdateService",
            "ecs:UpdateTaskProtection",
        ]
    );
    // ... and those are the only operations the crate's source sends.
    let mut calls: Vec<String> = Vec::new();
    for (file, client) in [
        ("celery-scale-ecs/src/services.rs", ".client\n"),
        ("celery-scale-ecs/src/protection.rs", ".client()\n"),
    ] {
        let source = repo_file(file);
        calls.extend(
            source
                .split(client)
                .skip(1)
                .filter_map(|rest| rest.trim_start().strip_prefix('.'))
                .map(|rest| rest.split('(').next().unwrap().to_string()),
        );
    }
    calls.sort();
    assert_eq!(
        calls,
        [
            "describe_services",
            "describe_tasks",
            "get_task_protection",
            "list_tasks",
            "update_service",
            "update_task_protection",
        ],
        "{calls:?}"
    );
    // The README shows the same policy.
    let readme = repo_file("celery-scale-ecs/README.md");
    let shown = blocks(&readme, "json");
    assert!(
        shown
            .iter()
            .any(|b| serde_json::from_str::<serde_json::Value>(b).ok() == Some(policy.clone())),
        "celery-scale-ecs/README.md shows docs/ecs.md's policy"
    );
}

/// The one-line Celery setting docs/ecs.md gives, run by `sh` against a stub task metadata
/// endpoint: the node name it sets is `celery@<task ID>`, and that maps to the task.
#[test]
fn the_node_name_from_the_task_metadata_endpoint_maps_to_the_task() {
    use std::io::{Read, Write};
    let doc = repo_file("docs/ecs.md");
    let line = blocks(&doc, "sh")
        .into_iter()
        .find(|b| b.contains("ECS_CONTAINER_METADATA_URI_V4"))
        .expect("the node-name line")
        .trim()
        .to_string();
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    let args = line
        .strip_prefix("celery -A yourapp worker ")
        .expect("a worker command");

    let task_id = "0123456789abcdef0123456789abcdef";
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v4/0a1b2c3d-meta", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.read(&mut buf).unwrap();
        let request = String::from_utf8_lossy(&buf[..n]).to_string();
        let body = format!(
            r#"{{"Cluster":"prod","TaskARN":"arn:aws:ecs:us-east-1:123456789012:task/prod/{task_id}","DesiredStatus":"RUNNING","KnownStatus":"RUNNING","Containers":[]}}"#
        );
        let _ = write!(
            sock,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        request
    });
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("printf '%s\\n' {args}")])
        .env("ECS_CONTAINER_METADATA_URI_V4", &url)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let request = server.join().unwrap();
    assert!(
        request.starts_with("GET /v4/0a1b2c3d-meta/task "),
        "{request}"
    );
    let words: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let node = format!("celery@{task_id}");
    assert_eq!(words, ["-n", node.as_str()]);
    let units = [
        celery_scale_core::protection::Unit::new(task_id),
        celery_scale_core::protection::Unit::new("fedcba9876543210fedcba9876543210"),
    ];
    assert_eq!(
        celery_scale_core::protection::unit_of(&node, &units).map(|u| u.id.as_str()),
        Some(task_id)
    );
}
