//! What reading a group costs on our side: parsing a described group into a snapshot, and a
//! `capacity()` served from the shared round's cache (the common case for many bindings).

use std::hint::black_box;
use std::time::Duration;

use aws_sdk_autoscaling::Client;
use aws_sdk_autoscaling::config::retry::RetryConfig;
use aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsOutput;
use aws_sdk_autoscaling::types::{AutoScalingGroup, Instance, LifecycleState};
use aws_smithy_mocks::{RuleMode, mock, mock_client};
use celery_scale_core::Scaler;
use celery_scale_ec2::{AutoScalingGroupConfig, AutoScalingGroups, AwsSettings, GroupSnapshot};
use criterion::{Criterion, criterion_group, criterion_main};

fn group(name: &str, instances: usize) -> AutoScalingGroup {
    let states = [
        LifecycleState::InService,
        LifecycleState::Pending,
        LifecycleState::Terminating,
    ];
    let mut g = AutoScalingGroup::builder()
        .auto_scaling_group_name(name)
        .min_size(0)
        .max_size(500)
        .desired_capacity(instances as i32);
    for i in 0..instances {
        g = g.instances(
            Instance::builder()
                .instance_id(format!("i-{i:017x}"))
                .lifecycle_state(states[i % 3].clone())
                .protected_from_scale_in(i % 2 == 0)
                .build(),
        );
    }
    g.build()
}

fn bench(c: &mut Criterion) {
    let g = group("celery-workers", 100);
    c.bench_function("snapshot_from_group_100_instances", |b| {
        b.iter(|| GroupSnapshot::from_group(black_box(&g)).unwrap())
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let describe = mock!(Client::describe_auto_scaling_groups).then_compute_output(|r| {
        let mut out = DescribeAutoScalingGroupsOutput::builder();
        for n in r.auto_scaling_group_names() {
            out = out.auto_scaling_groups(group(n, 10));
        }
        out.build()
    });
    let client: Client = mock_client!(aws_sdk_autoscaling, RuleMode::MatchAny, &[&describe], |c| c
        .retry_config(RetryConfig::disabled()));
    let groups = AutoScalingGroups::new(
        client,
        AwsSettings::default().cache_ttl(Duration::from_secs(60)),
    )
    .unwrap();
    let scalers: Vec<_> = (0..50)
        .map(|i| {
            groups
                .scaler(AutoScalingGroupConfig::new(format!("g{i}")))
                .unwrap()
        })
        .collect();
    rt.block_on(scalers[0].capacity()).unwrap();
    c.bench_function("capacity_cached_one_of_50_groups", |b| {
        b.iter(|| rt.block_on(scalers[black_box(17)].capacity()).unwrap())
    });
    let fresh = AutoScalingGroups::new(
        groups.client().clone(),
        AwsSettings::default().cache_ttl(Duration::ZERO),
    )
    .unwrap();
    let fresh_scalers: Vec<_> = (0..50)
        .map(|i| {
            fresh
                .scaler(AutoScalingGroupConfig::new(format!("g{i}")))
                .unwrap()
        })
        .collect();
    c.bench_function("capacity_uncached_describe_50_groups_mock_sdk", |b| {
        b.iter(|| {
            rt.block_on(fresh_scalers[black_box(17)].capacity())
                .unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
