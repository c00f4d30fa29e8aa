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
    assert_eq!(actions, ["ecs:DescribeServices", "ecs:UpdateService"]);
    // ... and those are the only operations the crate's source sends.
    let source = repo_file("celery-scale-ecs/src/services.rs");
    let calls: Vec<&str> = source
        .split(".client\n")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('.'))
        .map(|rest| rest.split('(').next().unwrap())
        .collect();
    assert_eq!(calls, ["describe_services", "update_service"], "{calls:?}");
}
