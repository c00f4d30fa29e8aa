//! `celery-scale check`: one dry tick of every binding after the warm-up, printed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use celery_scale_core::record::{DecisionRecord, Outcome};

use crate::{Failure, backends, load};

/// The longest warm-up wait accepted (a larger `--warmup-timeout` is cut to it).
const MAX_WARMUP: Duration = Duration::from_secs(600);

/// Validates, connects, waits up to `warmup` for every binding's worker-event feed, ticks every
/// binding once without setting anything, and prints the records. Fails when a binding could
/// not observe its queues or read its capacity.
pub async fn check(path: &Path, warmup: Duration, json: bool) -> Result<(), Failure> {
    let (config, backends) = load(path).await?;
    let mut bindings = Vec::with_capacity(config.bindings.len());
    for b in &config.bindings {
        // No lease: a check must never take the lease from, or keep it away from, a running copy.
        let build = backends::factory(Arc::clone(&backends), b, true, None, None);
        bindings.push(build().map_err(|e| Failure::Setup(e.to_string()))?);
    }
    // The feeds warm up in the background together: one deadline for all of them.
    let deadline = tokio::time::Instant::now() + warmup.min(MAX_WARMUP);
    let mut records = Vec::with_capacity(bindings.len());
    for b in &mut bindings {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !b.wait_warmed_up(left).await {
            tracing::warn!(
                binding = %b.settings().name,
                "the worker-event feed did not warm up within {}; worker figures are unknown",
                humantime::format_duration(warmup)
            );
        }
        records.push(b.tick().await);
    }
    for b in bindings {
        b.close().await;
    }
    if json {
        let text = serde_json::to_string_pretty(&records)
            .map_err(|e| Failure::Setup(format!("cannot print the records: {e}")))?;
        println!("{text}");
    } else {
        for (r, b) in records.iter().zip(&config.bindings) {
            println!("{}", describe(r, b.source.kind(), &b.scaler));
        }
    }
    let failed: Vec<&str> = records
        .iter()
        .filter(|r| r.observation_error.is_some() || r.capacity_error.is_some())
        .map(|r| r.binding.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Binding(format!(
            "could not observe or read capacity for: {}",
            failed.join(", ")
        )))
    }
}

/// One binding's record in words.
fn describe(r: &DecisionRecord, source: &str, scaler: &crate::config::ScalerConfig) -> String {
    let target = match scaler {
        crate::config::ScalerConfig::Ecs(c) => format!("ECS service {}/{}", c.cluster, c.service),
        crate::config::ScalerConfig::Ec2(c) => format!("Auto Scaling Group {}", c.group_name),
    };
    let mut lines = vec![format!("binding {:?} ({source} -> {target})", r.binding)];
    match (&r.observation, &r.observation_error) {
        (_, Some(e)) => lines.push(format!("  observe: FAILED ({:?}): {}", e.kind, e.message)),
        (Some(o), None) => {
            let opt = |v: Option<u64>| v.map_or("unknown".to_string(), |v| v.to_string());
            let mut line = format!(
                "  queues: {} ready, {} in flight, {} executing, {} live workers",
                o.ready,
                opt(o.in_flight),
                opt(o.executing),
                opt(o.live_workers.map(u64::from))
            );
            if let Some(u) = &o.workers_unknown {
                line.push_str(&format!(" (worker figures unknown: {})", u.why));
            }
            lines.push(line);
        }
        (None, None) => {}
    }
    match (&r.capacity, &r.capacity_error) {
        (_, Some(e)) => lines.push(format!("  capacity: FAILED ({:?}): {}", e.kind, e.message)),
        (Some(c), None) => lines.push(format!(
            "  capacity: desired {}, running {}, pending {} ({} worker process(es) per unit)",
            c.units.desired, c.units.running, c.units.pending, c.workers_per_unit
        )),
        (None, None) => {}
    }
    let would = match &r.outcome {
        Outcome::WouldSet { from, to } => format!("would set {from} -> {to}"),
        Outcome::Unchanged { units } => format!("would keep {units}"),
        Outcome::Held { why } => format!("would hold: {why}"),
        other => format!("{other:?}"),
    };
    lines.push(format!("  decision: {would}: {}", r.reason()));
    lines.join("\n")
}
