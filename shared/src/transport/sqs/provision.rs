//! Finding and creating the queues: the work queue with its `RedrivePolicy`, and its DLQ.
//!
//! | queue | attributes |
//! |---|---|
//! | `<name>-dlq` | `MaximumMessageSize = 262144`, `MessageRetentionPeriod` = 14 days |
//! | `<name>` | `RedrivePolicy {deadLetterTargetArn: <dlq>, maxReceiveCount: max_deliveries}`, `MaximumMessageSize = 262144`, `VisibilityTimeout` = the lease |
//!
//! FIFO queues are created with `ContentBasedDeduplication = false`: every send carries its own
//! `MessageDeduplicationId`. Only `provision`, and `run` with `transport.declare` on, create or
//! change queues; a queue without a `RedrivePolicy` is refused (no crash-loop guard, no DLQ).

use aws_sdk_sqs::{error::SdkError, types::QueueAttributeName, Client};

use super::{
    config::{SqsConfig, MAX_MESSAGE_BYTES, MAX_RETENTION_SECONDS},
    error::{code, is_queue_missing, sdk_err},
};
use crate::error::{Error, Result};

/// Where the queues are, once known.
pub(super) struct Urls {
    pub(super) queue: String,
    pub(super) dlq: String,
    /// The work queue's `maxReceiveCount` (attempts of crash-loop dead letters).
    pub(super) max_receive_count: u32,
}

/// Finds the queues; `None` when the work queue does not exist and `create` is off.
pub(super) async fn resolve(
    client: &Client,
    config: &SqsConfig,
    create: bool,
) -> Result<Option<Urls>> {
    let known = match &config.queue_url {
        Some(url) => Some(url.clone()),
        None => queue_url(client, &config.queue_name).await?,
    };
    let existing = match known {
        Some(url) => match redrive_policy(client, &url).await {
            Ok(policy) => Some((url, policy)),
            Err(e) if is_queue_missing(&e) => None,
            Err(e) => return Err(sdk_err("GetQueueAttributes", &config.queue_name, e)),
        },
        None => None,
    };
    match existing {
        Some((url, Some((dlq_name, max)))) => Ok(Some(Urls {
            dlq: sibling_url(&url, &dlq_name),
            queue: url,
            max_receive_count: max,
        })),
        Some((_, None)) => Err(Error::Config(format!(
            "key `transport.url`: SQS queue {:?} has no RedrivePolicy (no crash-loop guard, no DLQ): run `provision`",
            config.queue_name
        ))),
        None if create => {
            let (queue, dlq) = provision_queues(client, config).await?;
            Ok(Some(Urls {
                queue,
                dlq,
                max_receive_count: config.max_receive_count,
            }))
        }
        None => Ok(None),
    }
}

/// The error of an operation on a queue that does not exist.
pub(super) fn missing(config: &SqsConfig) -> Error {
    Error::Config(format!(
        "key `transport.url`: SQS queue {:?} does not exist: run `provision` (only `provision`, and `run` with transport.declare on, create queues)",
        config.queue_name
    ))
}

pub(super) async fn queue_url(client: &Client, name: &str) -> Result<Option<String>> {
    match client.get_queue_url().queue_name(name).send().await {
        Ok(out) => Ok(out.queue_url().map(str::to_owned)),
        Err(e) if is_queue_missing(&e) => Ok(None),
        Err(e) => Err(sdk_err("GetQueueUrl", name, e)),
    }
}

/// The DLQ name and `maxReceiveCount` of a queue's `RedrivePolicy`, if it has one.
pub(super) async fn redrive_policy(
    client: &Client,
    url: &str,
) -> Result<
    Option<(String, u32)>,
    SdkError<aws_sdk_sqs::operation::get_queue_attributes::GetQueueAttributesError>,
> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await?;
    let policy = out
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok());
    Ok(policy.and_then(|p| {
        let arn = p.get("deadLetterTargetArn")?.as_str()?;
        let max = p.get("maxReceiveCount")?;
        let max = max
            .as_u64()
            .or_else(|| max.as_str().and_then(|s| s.parse().ok()))?;
        Some((arn.rsplit(':').next()?.to_owned(), u32::try_from(max).ok()?))
    }))
}

/// Creates (or updates) the DLQ, then the queue with its `RedrivePolicy`; returns both URLs.
pub(super) async fn provision_queues(
    client: &Client,
    config: &SqsConfig,
) -> Result<(String, String)> {
    let size = MAX_MESSAGE_BYTES.to_string();
    let dlq_url = ensure_queue(
        client,
        &config.dlq_name,
        config.fifo,
        vec![
            (QueueAttributeName::MaximumMessageSize, size.clone()),
            (
                QueueAttributeName::MessageRetentionPeriod,
                MAX_RETENTION_SECONDS.to_string(),
            ),
        ],
    )
    .await?;
    let arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| sdk_err("GetQueueAttributes", &config.dlq_name, e))?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| Error::transport_msg(format!("sqs: {} has no QueueArn", config.dlq_name)))?;
    let policy = serde_json::json!({
        "deadLetterTargetArn": arn,
        "maxReceiveCount": config.max_receive_count,
    })
    .to_string();
    let queue_url = ensure_queue(
        client,
        &config.queue_name,
        config.fifo,
        vec![
            (QueueAttributeName::MaximumMessageSize, size),
            (
                QueueAttributeName::VisibilityTimeout,
                config.visibility.as_secs().to_string(),
            ),
            (QueueAttributeName::RedrivePolicy, policy),
        ],
    )
    .await?;
    Ok((queue_url, dlq_url))
}

/// Creates a queue with `attrs`, or sets `attrs` on it when it exists.
async fn ensure_queue(
    client: &Client,
    name: &str,
    fifo: bool,
    attrs: Vec<(QueueAttributeName, String)>,
) -> Result<String> {
    if let Some(url) = queue_url(client, name).await? {
        set_attributes(client, name, &url, attrs).await?;
        return Ok(url);
    }
    let mut create = client.create_queue().queue_name(name);
    for (k, v) in &attrs {
        create = create.attributes(k.clone(), v);
    }
    if fifo {
        create = create
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(QueueAttributeName::ContentBasedDeduplication, "false");
    }
    match create.send().await {
        Ok(out) => out
            .queue_url()
            .map(str::to_owned)
            .ok_or_else(|| Error::transport_msg(format!("sqs: CreateQueue {name}: no URL"))),
        // Created meanwhile by someone else, with other attributes: make them ours.
        Err(e) if code(&e) == Some("QueueAlreadyExists") || code(&e) == Some("QueueNameExists") => {
            let url = queue_url(client, name)
                .await?
                .ok_or_else(|| Error::transport_msg(format!("sqs: {name} exists and does not")))?;
            set_attributes(client, name, &url, attrs).await?;
            Ok(url)
        }
        Err(e) => Err(sdk_err("CreateQueue", name, e)),
    }
}

async fn set_attributes(
    client: &Client,
    name: &str,
    url: &str,
    attrs: Vec<(QueueAttributeName, String)>,
) -> Result<()> {
    client
        .set_queue_attributes()
        .queue_url(url)
        .set_attributes(Some(attrs.into_iter().collect()))
        .send()
        .await
        .map_err(|e| sdk_err("SetQueueAttributes", name, e))?;
    Ok(())
}

/// The URL of a queue in the same account and region as `url`.
pub(super) fn sibling_url(url: &str, name: &str) -> String {
    match url.trim_end_matches('/').rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sibling_is_in_the_same_account_and_region() {
        assert_eq!(
            sibling_url("http://127.0.0.1:5000/123456789012/jobs", "jobs-dlq"),
            "http://127.0.0.1:5000/123456789012/jobs-dlq"
        );
    }
}
