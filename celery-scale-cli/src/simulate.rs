//! `celery-scale simulate`: replays a trace through exactly the configured policies, units
//! (`workers_per_task` / `workers_per_instance`) and prefetch (`held_per_worker`), in the
//! simulator's virtual time, so a configuration can be tried before it is deployed. Connects to
//! nothing.

use std::path::Path;
use std::time::Duration;

use celery_scale_sim::{Arrival, SimConfig, Simulator, Trace};

use celery_scale_core::LoopSettings;
use celery_scale_core::config::PolicyConfig;
use serde::Deserialize;

use crate::Failure;
use crate::config::ScalerConfig;

/// What the simulator needs of the configuration file: each binding's loop, policy and units.
/// The sources (and their secrets) and the AWS section are not read, so a configuration can be
/// tried where its secrets are not set.
#[derive(Debug, Deserialize)]
struct SimFile {
    bindings: Vec<SimBinding>,
}

#[derive(Debug, Deserialize)]
struct SimBinding {
    #[serde(rename = "loop", default)]
    settings: LoopSettings,
    #[serde(default)]
    policy: PolicyConfig,
    scaler: ScalerConfig,
}

impl SimFile {
    fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the configuration {}: {e}", path.display()))?;
        let parsed: Result<SimFile, _> = if path.extension().is_some_and(|e| e == "json") {
            celery_scale_core::config::parse_json(&text)
        } else {
            celery_scale_core::config::parse_toml(&text)
        };
        let file = parsed.map_err(|e| format!("{}: {e}", path.display()))?;
        for (i, b) in file.bindings.iter().enumerate() {
            b.settings.validate().map_err(|e| {
                format!(
                    "{}: {}",
                    path.display(),
                    e.within(&format!("bindings[{i}].loop"))
                )
            })?;
            b.scaler.validate().map_err(|e| {
                format!(
                    "{}: {}",
                    path.display(),
                    e.within(&format!("bindings[{i}].scaler"))
                )
            })?;
        }
        Ok(file)
    }
}

/// The built-in trace when none is given: quiet, a burst of 300 ten-second tasks over a minute,
/// quiet again, then a trickle of one-minute tasks.
fn built_in() -> Trace {
    let mut arrivals = Vec::new();
    for s in 60..120 {
        arrivals.push(Arrival {
            at: Duration::from_secs(s),
            count: 5,
            duration: Duration::from_secs(10),
            queue: "celery".into(),
        });
    }
    for s in (600..1200).step_by(30) {
        arrivals.push(Arrival {
            at: Duration::from_secs(s),
            count: 1,
            duration: Duration::from_secs(60),
            queue: "celery".into(),
        });
    }
    Trace::new(arrivals)
}

/// What to simulate besides the configuration.
#[derive(Debug, Clone)]
pub struct SimulateArgs<'a> {
    /// A trace CSV, or the built-in burst.
    pub trace: Option<&'a Path>,
    /// Only this binding.
    pub binding: Option<&'a str>,
    /// The seed of every random choice.
    pub seed: u64,
    /// Time from asking for a unit to its workers taking tasks.
    pub startup: Duration,
}

/// Runs every (or the named) binding's policy over the trace and prints a summary each.
pub fn simulate(path: &Path, args: SimulateArgs<'_>) -> Result<(), Failure> {
    let config = SimFile::load(path).map_err(Failure::Setup)?;
    let trace = match args.trace {
        Some(p) => Trace::read(p).map_err(|e| Failure::Setup(format!("{}: {e}", p.display())))?,
        None => built_in(),
    };
    let mut ran = 0;
    println!(
        "trace: {} tasks over {}",
        trace.tasks(),
        humantime::format_duration(trace.end())
    );
    for b in &config.bindings {
        if args.binding.is_some_and(|name| name != b.settings.name) {
            continue;
        }
        ran += 1;
        let workers_per_unit = match &b.scaler {
            ScalerConfig::Ecs(c) => c.workers_per_task.get(),
            ScalerConfig::Ec2(c) => c.workers_per_instance,
        };
        let world = SimConfig {
            seed: args.seed,
            interval: b.settings.interval,
            startup: args.startup,
            workers_per_unit,
            prefetch_multiplier: b.policy.held_per_worker,
            ..SimConfig::default()
        };
        let policy = b.policy.build().map_err(|e| {
            Failure::Setup(format!(
                "{}: binding {:?}: {}",
                path.display(),
                b.settings.name,
                e.within("policy")
            ))
        })?;
        let result = Simulator::new(world)
            .run(&trace, policy)
            .map_err(|e| Failure::Setup(format!("binding {:?}: {e}", b.settings.name)))?;
        let s = &result.summary;
        println!(
            "binding {:?} ({} worker process(es) per unit, prefetch {}, start-up {}):\n  \
             completed {} of {} tasks; {:.0} worker-seconds ({:.0} busy); wait p50 {:.1} s, \
             p95 {:.1} s, max {:.1} s; peak {} workers; {} scaling actions, {} launches",
            b.settings.name,
            workers_per_unit,
            b.policy.held_per_worker,
            humantime::format_duration(args.startup),
            s.completed,
            s.tasks,
            s.worker_seconds,
            s.busy_seconds,
            s.wait_p50_s,
            s.wait_p95_s,
            s.wait_max_s,
            s.peak_workers,
            s.scaling_actions,
            s.launches
        );
    }
    if ran == 0 {
        return Err(Failure::Setup(format!(
            "no binding named {:?}",
            args.binding.unwrap_or_default()
        )));
    }
    Ok(())
}
