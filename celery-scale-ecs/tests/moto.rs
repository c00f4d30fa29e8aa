//! `EcsServiceScaler` against moto's ECS server: the core conformance checks, several services
//! through one handle, and a missing service.

use std::time::Duration;

use aws_sdk_ecs::Client;
use aws_sdk_ecs::types::ContainerDefinition;
use celery_scale_core::conformance;
use celery_scale_core::{Error, Scaler};
use celery_scale_ecs::{AwsSettings, EcsError, EcsServiceConfig, EcsServices};

async fn client() -> Option<Client> {
    let url = celery_scale_testing::service("CELERY_SCALE_MOTO_URL")?;
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(url)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ecs::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    Some(Client::new(&config))
}

/// Creates `cluster` with services `names`, each at desired count 1.
async fn create(client: &Client, cluster: &str, names: &[String]) {
    client
        .create_cluster()
        .cluster_name(cluster)
        .send()
        .await
        .unwrap();
    client
        .register_task_definition()
        .family("celery-worker")
        .container_definitions(
            ContainerDefinition::builder()
                .name("worker")
                .image("python:3.12")
                .memory(512)
                .build(),
        )
        .send()
        .await
        .unwrap();
    for name in names {
        client
            .create_service()
            .cluster(cluster)
            .service_name(name)
            .task_definition("celery-worker")
            .desired_count(1)
            .send()
            .await
            .unwrap();
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

#[tokio::test]
async fn conforms_on_moto() {
    let Some(client) = client().await else { return };
    let cluster = unique("conformance");
    create(&client, &cluster, &["workers".to_string()]).await;
    let services =
        EcsServices::new(client, AwsSettings::default().cache_ttl(Duration::ZERO)).unwrap();
    let scaler = services
        .scaler(
            EcsServiceConfig::new(&cluster, "workers")
                .workers_per_task(4)
                .unwrap(),
        )
        .unwrap();
    assert_eq!(scaler.workers_per_unit().get(), 4);
    conformance::scaler(&scaler, 0, 3).await;
}

#[tokio::test]
async fn a_missing_service_is_a_typed_error() {
    let Some(client) = client().await else { return };
    let cluster = unique("missing");
    create(&client, &cluster, &[]).await;
    let services = EcsServices::new(client, AwsSettings::default()).unwrap();
    let scaler = services
        .scaler(EcsServiceConfig::new(&cluster, "no-such-service"))
        .unwrap();
    match scaler.capacity().await {
        Err(Error::NotFound { what, .. }) => assert!(what.contains("no-such-service"), "{what}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    conformance::dead_scaler(&scaler).await;
}

#[tokio::test]
async fn many_services_share_one_handle() {
    let Some(client) = client().await else { return };
    let cluster = unique("many");
    let names: Vec<String> = (0..12).map(|i| format!("svc-{i}")).collect();
    create(&client, &cluster, &names).await;
    let services = EcsServices::new(client.clone(), AwsSettings::default()).unwrap();
    let scalers: Vec<_> = names
        .iter()
        .map(|n| services.scaler(EcsServiceConfig::new(&cluster, n)).unwrap())
        .collect();
    let reads = futures::future::join_all(scalers.iter().map(|s| s.capacity())).await;
    for r in reads {
        assert_eq!(r.unwrap().desired, 1);
    }
    scalers[11].set_desired(5).await.unwrap();
    assert_eq!(
        scalers[11].capacity().await.unwrap().desired,
        5,
        "a set invalidates the cache"
    );
    let seen = client
        .describe_services()
        .cluster(&cluster)
        .services("svc-11")
        .send()
        .await
        .unwrap();
    assert_eq!(seen.services()[0].desired_count(), 5, "moto saw the update");
}

#[tokio::test]
async fn reads_are_batched_per_cluster_and_a_missing_cluster_fails_only_its_services() {
    let Some(client) = client().await else { return };
    let (a, b) = (unique("batch-a"), unique("batch-b"));
    let in_a: Vec<String> = (0..12).map(|i| format!("a-{i}")).collect();
    let in_b: Vec<String> = (0..3).map(|i| format!("b-{i}")).collect();
    create(&client, &a, &in_a).await;
    create(&client, &b, &in_b).await;
    let gone = unique("no-such-cluster");
    // A long TTL: this test counts calls, whatever the machine's load.
    let services = EcsServices::new(
        client,
        AwsSettings::default().cache_ttl(Duration::from_secs(60)),
    )
    .unwrap();
    let mut scalers: Vec<_> = in_a
        .iter()
        .map(|n| services.scaler(EcsServiceConfig::new(&a, n)).unwrap())
        .chain(
            in_b.iter()
                .map(|n| services.scaler(EcsServiceConfig::new(&b, n)).unwrap()),
        )
        .collect();
    let lost = services
        .scaler(EcsServiceConfig::new(&gone, "workers"))
        .unwrap();
    let reads = futures::future::join_all(scalers.iter().map(|s| s.read())).await;
    assert!(
        reads
            .iter()
            .all(|r| r.as_ref().is_ok_and(|c| c.desired == 1))
    );
    match lost.read().await {
        Err(EcsError::ServiceNotFound {
            cluster, reason, ..
        }) => {
            assert_eq!(
                (cluster.as_str(), reason.as_str()),
                (gone.as_str(), "ClusterNotFoundException")
            )
        }
        other => panic!("expected ServiceNotFound, got {other:?}"),
    }
    // Cluster a: 2 calls (10 + 2), cluster b: 1, the missing cluster: 1; all in one read.
    assert_eq!(services.calls().describe_services, 4);
    assert_eq!(services.calls().update_service, 0);
    // Setting one service leaves the shared read valid for the others.
    let last = scalers.pop().unwrap();
    last.update(2).await.unwrap();
    assert_eq!(last.read().await.unwrap().desired, 2);
    assert_eq!(scalers[0].read().await.unwrap().desired, 1);
    assert_eq!(
        services.calls().describe_services,
        4,
        "served by the patched read"
    );
    match lost.update(1).await {
        Err(EcsError::ServiceNotFound { reason, .. }) => {
            assert_eq!(reason, "ClusterNotFoundException")
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

/// The settings path a daemon takes: `AwsSettings::sdk_config_from` (here with fixed test
/// credentials instead of the host's chain) and `from_sdk_config`, the settings' region and
/// endpoint applied by the handle itself.
#[tokio::test]
async fn a_handle_from_settings_reaches_the_endpoint_they_name() {
    let Some(url) = celery_scale_testing::service("CELERY_SCALE_MOTO_URL") else {
        return;
    };
    let Some(client) = client().await else { return };
    let cluster = unique("settings");
    create(&client, &cluster, &["workers".to_string()]).await;
    let settings = AwsSettings::default()
        .region("us-east-1")
        .endpoint_url(url)
        .max_attempts(1)
        .cache_ttl(Duration::ZERO);
    let loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).credentials_provider(
        aws_sdk_ecs::config::Credentials::new("testing", "testing", None, None, "test"),
    );
    let sdk = settings.sdk_config_from(loader).await.unwrap();
    let services = EcsServices::from_sdk_config(&sdk, settings).unwrap();
    let scaler = services
        .scaler(EcsServiceConfig::new(&cluster, "workers"))
        .unwrap();
    assert_eq!(scaler.read().await.unwrap().desired, 1);
    scaler.update(2).await.unwrap();
    assert_eq!(scaler.read().await.unwrap().desired, 2);
}
