//! Task scale-in protection for [`EcsServiceScaler`]: the service's tasks as
//! [`Unit`]s (`ListTasks` -> `DescribeTasks` -> `GetTaskProtection`) and
//! `UpdateTaskProtection` in batches.

use std::collections::BTreeSet;
use std::error::Error as StdError;
use std::fmt::Debug;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::{Failure, Task};
use celery_scale_aws::{AwsError, Operation};
use celery_scale_core::protection::{Unit, UnitProtection};

use crate::error::{
    DESCRIBE_TASKS, GET_TASK_PROTECTION, LIST_TASKS, ModeledCode, TaskFailure,
    UPDATE_TASK_PROTECTION, classify, code_of,
};
use crate::{EcsError, EcsServiceScaler};

/// Tasks per `DescribeTasks` call (the API's limit).
pub const TASKS_PER_DESCRIBE: usize = 100;
/// Tasks per `GetTaskProtection` call (the API's limit).
pub const TASKS_PER_GET_PROTECTION: usize = 100;
/// Tasks per `UpdateTaskProtection` call (the API's limit).
pub const TASKS_PER_UPDATE_PROTECTION: usize = 10;
/// Task ARNs per `ListTasks` page (the API's maximum).
const LIST_PAGE: i32 = 100;
/// More pages than any service can have (ECS allows 5,000 tasks a service): a longer listing
/// is a bad answer, not a reason to loop for ever.
const MAX_LIST_PAGES: usize = 200;

/// The task ID of a task ARN (`arn:aws:ecs:region:account:task/cluster/ID`, or the old
/// `task/ID` form): its last `/`-separated part. A bare ID is its own ID.
pub(crate) fn task_id(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// Whether ECS is stopping the task (or has stopped it): its desired status is `STOPPED`, or
/// its last status is one of the stop sequence's.
pub(crate) fn is_stopping(desired_status: Option<&str>, last_status: Option<&str>) -> bool {
    desired_status == Some("STOPPED")
        || matches!(
            last_status,
            Some("DEACTIVATING" | "STOPPING" | "DEPROVISIONING" | "STOPPED")
        )
}

/// The names a Celery worker of `task` may carry as the host part of its node name (`%h` in
/// `celery@%h` is the container's host name):
/// - each private IPv4 address of its ENI attachments (`awsvpc`, every Fargate task), as is
///   and as `ip-a-b-c-d` (the host name Fargate and `awsvpc` tasks get), and the ENI's
///   `privateDnsName`;
/// - the same from each container's network interfaces;
/// - each container's `runtimeId`'s first 12 characters (Docker's container host name in
///   `bridge` mode).
pub(crate) fn aliases(task: &Task) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |name: String| {
        if !name.is_empty() && !out.contains(&name) {
            out.push(name);
        }
    };
    let mut address = |value: &str| {
        // Only a well-formed address becomes an alias: `ip-...` is derived from it.
        if let Ok(ip) = value.trim().parse::<Ipv4Addr>() {
            push(ip.to_string());
            push(format!("ip-{}", ip.to_string().replace('.', "-")));
        }
    };
    let mut dns_names = Vec::new();
    for attachment in task.attachments() {
        for detail in attachment.details() {
            match (detail.name(), detail.value()) {
                (Some("privateIPv4Address"), Some(v)) => address(v),
                (Some("privateDnsName"), Some(v)) => dns_names.push(v.trim().to_string()),
                _ => {}
            }
        }
    }
    for container in task.containers() {
        for interface in container.network_interfaces() {
            if let Some(v) = interface.private_ipv4_address() {
                address(v);
            }
        }
    }
    for name in dns_names {
        push(name);
    }
    for container in task.containers() {
        if let Some(id) = container.runtime_id() {
            let short: String = id.trim().chars().take(12).collect();
            if short.chars().count() == 12 && short.chars().all(|c| c.is_ascii_alphanumeric()) {
                push(short);
            }
        }
    }
    out
}

impl EcsServiceScaler {
    /// Sends one ECS call within the handle's `call_timeout`; a missing cluster or service is
    /// [`EcsError::ServiceNotFound`], every other failure is classified.
    async fn send<T, E, R>(
        &self,
        operation: Operation,
        call: impl Future<Output = Result<T, SdkError<E, R>>>,
    ) -> Result<T, EcsError>
    where
        E: ProvideErrorMetadata + ModeledCode + StdError + Send + Sync + 'static,
        R: Debug + Send + Sync + 'static,
    {
        let timeout = self.services().settings().call_timeout;
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => match code_of(&e) {
                Some(code @ ("ClusterNotFoundException" | "ServiceNotFoundException")) => {
                    Err(EcsError::ServiceNotFound {
                        cluster: self.config().cluster.clone(),
                        service: self.config().service.clone(),
                        reason: code.to_owned(),
                    })
                }
                _ => Err(classify(operation, e)),
            },
            Err(_) => Err(EcsError::Aws(AwsError::timed_out(operation, timeout))),
        }
    }

    /// The ARNs of the service's tasks whose desired status is `RUNNING` (running, or on the
    /// way), every page of `ListTasks`. Tasks ECS already stops are left out: a stopped task's
    /// address may be a new task's, and its workers are leaving anyway.
    async fn task_arns(&self) -> Result<Vec<String>, EcsError> {
        let config = self.config();
        let mut arns = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let call = self
                .services()
                .client()
                .list_tasks()
                .cluster(&config.cluster)
                .service_name(&config.service)
                .max_results(LIST_PAGE)
                .set_next_token(token.clone())
                .send();
            let page = self.send(LIST_TASKS, call).await?;
            arns.extend(page.task_arns().iter().cloned());
            match page.next_token() {
                Some(next) if Some(next) == token.as_deref() => {
                    return Err(invalid(LIST_TASKS, "the same nextToken twice"));
                }
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return Ok(arns),
            }
        }
        Err(invalid(
            LIST_TASKS,
            &format!("more than {MAX_LIST_PAGES} pages of tasks"),
        ))
    }

    /// The service's tasks as protection sees them, with the typed error: `ListTasks` (every
    /// page), `DescribeTasks` (at most 100 a call) and `GetTaskProtection` (at most 100 a call).
    /// A task listed but no longer described has gone and is left out. A task ECS protects
    /// without saying until when is taken as expiring now, so that a busy one is renewed.
    pub async fn tasks(&self) -> Result<Vec<Unit>, EcsError> {
        let arns = self.task_arns().await?;
        let cluster = &self.config().cluster;
        let describes = arns.chunks(TASKS_PER_DESCRIBE).map(|chunk| {
            let call = self
                .services()
                .client()
                .describe_tasks()
                .cluster(cluster)
                .set_tasks(Some(chunk.to_vec()))
                .send();
            self.send(DESCRIBE_TASKS, call)
        });
        let mut units: Vec<Unit> = Vec::new();
        for described in futures::future::try_join_all(describes).await? {
            for task in described.tasks() {
                let Some(arn) = task.task_arn() else {
                    tracing::warn!(cluster, "DescribeTasks answered a task without an ARN");
                    continue;
                };
                let id = task_id(arn).to_owned();
                if id.is_empty() || units.iter().any(|u| u.id == id) {
                    continue;
                }
                units.push(Unit {
                    aliases: aliases(task),
                    stopping: is_stopping(task.desired_status(), task.last_status()),
                    ..Unit::new(id)
                });
            }
        }
        let ids: Vec<String> = units.iter().map(|u| u.id.clone()).collect();
        let gets = ids.chunks(TASKS_PER_GET_PROTECTION).map(|chunk| {
            let call = self
                .services()
                .client()
                .get_task_protection()
                .cluster(cluster)
                .set_tasks(Some(chunk.to_vec()))
                .send();
            self.send(GET_TASK_PROTECTION, call)
        });
        let now = SystemTime::now();
        let mut failures = Vec::new();
        let mut answered: BTreeSet<String> = BTreeSet::new();
        for got in futures::future::try_join_all(gets).await? {
            for p in got.protected_tasks() {
                let Some(unit) = p
                    .task_arn()
                    .and_then(|arn| units.iter_mut().find(|u| u.id == task_id(arn)))
                else {
                    continue;
                };
                answered.insert(unit.id.clone());
                unit.protected = p.protection_enabled();
                unit.protected_until = match p.expiration_date() {
                    Some(at) => Some(SystemTime::try_from(*at).unwrap_or(now)),
                    None if unit.protected => Some(now),
                    None => None,
                };
            }
            failures.extend(task_failures(got.failures()));
        }
        // A task whose protection is not known is an error, unless ECS is stopping it (it is
        // never protected then, and its failure is that it has gone).
        failures.retain(|f| {
            !units
                .iter()
                .any(|u| u.id == f.task && u.stopping && !answered.contains(&u.id))
        });
        for unit in units
            .iter()
            .filter(|u| !u.stopping && !answered.contains(&u.id))
        {
            if !failures.iter().any(|f| f.task == unit.id) {
                failures.push(TaskFailure {
                    task: unit.id.clone(),
                    reason: "not in the answer".into(),
                    detail: None,
                });
            }
        }
        if !failures.is_empty() {
            return Err(EcsError::TaskFailures {
                operation: GET_TASK_PROTECTION,
                cluster: cluster.clone(),
                failures,
            });
        }
        Ok(units)
    }

    /// Protects (`protected = true`, for `protection_expires_in`) or releases the tasks `ids`
    /// with `UpdateTaskProtection`, at most 10 a call, with the typed error. Every batch is
    /// sent; tasks ECS lists in `failures` (one that stopped meanwhile) make the result
    /// [`EcsError::TaskFailures`] naming each, after the others were changed.
    pub async fn protect(&self, ids: &[String], protected: bool) -> Result<(), EcsError> {
        let cluster = &self.config().cluster;
        let minutes = self.config().protection_minutes();
        let updates = ids.chunks(TASKS_PER_UPDATE_PROTECTION).map(|chunk| {
            let mut call = self
                .services()
                .client()
                .update_task_protection()
                .cluster(cluster)
                .set_tasks(Some(chunk.to_vec()))
                .protection_enabled(protected);
            if protected {
                call = call.expires_in_minutes(minutes);
            }
            self.send(UPDATE_TASK_PROTECTION, call.send())
        });
        let mut failures = Vec::new();
        for answer in futures::future::join_all(updates).await {
            failures.extend(task_failures(answer?.failures()));
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(EcsError::TaskFailures {
                operation: UPDATE_TASK_PROTECTION,
                cluster: cluster.clone(),
                failures,
            })
        }
    }
}

fn task_failures(failures: &[Failure]) -> Vec<TaskFailure> {
    failures
        .iter()
        .map(|f| TaskFailure {
            task: task_id(f.arn().unwrap_or("(no arn)")).to_owned(),
            reason: f.reason().unwrap_or("(no reason)").to_owned(),
            detail: f.detail().map(str::to_owned),
        })
        .collect()
}

fn invalid(operation: Operation, message: &str) -> EcsError {
    EcsError::Aws(AwsError::InvalidResponse {
        operation,
        message: message.to_owned(),
        source: None,
    })
}

#[async_trait]
impl UnitProtection for EcsServiceScaler {
    async fn units(&self) -> celery_scale_core::Result<Vec<Unit>> {
        Ok(self.tasks().await?)
    }

    async fn set_protected(
        &self,
        ids: &[String],
        protected: bool,
    ) -> celery_scale_core::Result<()> {
        Ok(self.protect(ids, protected).await?)
    }

    /// A third of `protection_expires_in`.
    fn renew_within(&self) -> Duration {
        self.config().protection_expires_in / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ecs::types::{Attachment, Container, KeyValuePair, NetworkInterface};

    #[test]
    fn task_ids_are_the_last_part_of_the_arn() {
        assert_eq!(
            task_id("arn:aws:ecs:us-east-1:123456789012:task/prod/0123abcd4567ef89"),
            "0123abcd4567ef89"
        );
        assert_eq!(task_id("arn:aws:ecs:us-east-1:1:task/0123"), "0123");
        assert_eq!(task_id("0123"), "0123");
    }

    #[test]
    fn the_stopping_rule() {
        assert!(!is_stopping(Some("RUNNING"), Some("RUNNING")));
        assert!(!is_stopping(Some("RUNNING"), Some("PROVISIONING")));
        assert!(!is_stopping(Some("RUNNING"), Some("PENDING")));
        assert!(!is_stopping(None, None));
        assert!(is_stopping(Some("STOPPED"), Some("RUNNING")));
        for last in ["DEACTIVATING", "STOPPING", "DEPROVISIONING", "STOPPED"] {
            assert!(is_stopping(Some("RUNNING"), Some(last)), "{last}");
        }
    }

    #[test]
    fn aliases_skip_bad_addresses_and_short_runtime_ids() {
        let task = Task::builder()
            .attachments(
                Attachment::builder()
                    .r#type("ElasticNetworkInterface")
                    .details(
                        KeyValuePair::builder()
                            .name("privateIPv4Address")
                            .value("10.0.1.300")
                            .build(),
                    )
                    .details(
                        KeyValuePair::builder()
                            .name("privateIPv4Address")
                            .value("10.0.1.23")
                            .build(),
                    )
                    .build(),
            )
            .containers(
                Container::builder()
                    .runtime_id("abc")
                    .network_interfaces(
                        NetworkInterface::builder()
                            .private_ipv4_address("10.0.1.23")
                            .build(),
                    )
                    .build(),
            )
            .build();
        assert_eq!(aliases(&task), ["10.0.1.23", "ip-10-0-1-23"]);
    }
}
